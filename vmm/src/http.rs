//! The API's HTTP/1.1, one request per connection: read the head (parsed by `httparse`) and a
//! `Content-Length` body, answer, close.
//!
//! The API serves its own connections (rather than an HTTP server library that accepts them
//! itself) so that every connection is checked with SO_PEERCRED before a byte is read from it:
//! see [`baton_service::access`]. Clients (`batonctl`, `curl --unix-socket`) send one small request
//! per connection; keep-alive, chunked bodies and pipelining are not needed and not served.

use std::io::{Read, Write};

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
/// Largest request body.
pub const MAX_BODY: usize = 64 << 10;
/// Most request headers.
const MAX_HEADERS: usize = 32;

/// Why a request could not be read; [`HttpError::status`] says what to answer, if anything.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The connection failed or closed before a whole request arrived.
    #[error("reading the request: {0}")]
    Io(#[from] std::io::Error),
    /// Not HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(httparse::Error),
    /// The head is longer than [`MAX_HEAD`].
    #[error("request head longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The body is longer than [`MAX_BODY`].
    #[error("request body of {0} bytes (at most {MAX_BODY})")]
    BodyTooLarge(usize),
    /// A Content-Length that is not a number.
    #[error("invalid Content-Length")]
    BadLength,
    /// A chunked (or otherwise encoded) body.
    #[error("Transfer-Encoding is not supported; send a Content-Length")]
    Encoded,
    /// A body that is not UTF-8.
    #[error("the request body is not UTF-8")]
    NotUtf8,
}

impl HttpError {
    /// The status to answer with; `None` when the connection is gone.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Io(_) => None,
            HttpError::Malformed(_) | HttpError::BadLength | HttpError::NotUtf8 => Some(400),
            HttpError::HeadTooLarge => Some(431),
            HttpError::BodyTooLarge(_) => Some(413),
            HttpError::Encoded => Some(411),
        }
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The request target, e.g. `/api/v1/vm.info`.
    pub path: String,
    /// The body (empty without one).
    pub body: String,
}

/// Reads one request from `conn`. Answers `Expect: 100-continue` on the way.
pub fn read_request<S: Read + Write>(conn: &mut S) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf).map_err(HttpError::Malformed)? {
            httparse::Status::Complete(head_len) => {
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                let mut length = 0usize;
                let mut expect_continue = false;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or(HttpError::BadLength)?;
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(HttpError::Encoded);
                    } else if h.name.eq_ignore_ascii_case("expect")
                        && h.value.eq_ignore_ascii_case(b"100-continue")
                    {
                        expect_continue = true;
                    }
                }
                if length > MAX_BODY {
                    return Err(HttpError::BodyTooLarge(length));
                }
                let mut body = buf.split_off(head_len);
                if body.len() < length && expect_continue {
                    conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
                }
                while body.len() < length {
                    let n = conn.read(&mut chunk)?;
                    if n == 0 {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                    }
                    body.extend_from_slice(chunk.get(..n).unwrap_or_default());
                }
                body.truncate(length);
                let body = String::from_utf8(body).map_err(|_| HttpError::NotUtf8)?;
                return Ok(Request { method, path, body });
            }
            httparse::Status::Partial if buf.len() >= MAX_HEAD => {
                return Err(HttpError::HeadTooLarge);
            }
            httparse::Status::Partial => {
                let n = conn.read(&mut chunk)?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            }
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "",
    }
}

/// Writes a response with a JSON `body` (none for 204) and `Connection: close`.
pub fn write_response<W: Write>(conn: &mut W, status: u16, body: &str) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nConnection: close\r\n",
        reason(status)
    );
    if status != 204 {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    out.push_str("\r\n");
    if status != 204 {
        out.push_str(body);
    }
    conn.write_all(out.as_bytes())?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that hands out its input `step` bytes at a time and records what is
    /// written.
    struct Conn {
        input: Vec<u8>,
        at: usize,
        step: usize,
        output: Vec<u8>,
    }

    impl Conn {
        fn new(input: &[u8], step: usize) -> Self {
            Conn {
                input: input.to_vec(),
                at: 0,
                step,
                output: Vec::new(),
            }
        }
    }

    impl Read for Conn {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.input.len() - self.at);
            buf[..n].copy_from_slice(&self.input[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    impl Write for Conn {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn requests_split_anywhere_are_read_whole() {
        let raw = b"PUT /api/v1/vm.live-update HTTP/1.1\r\nHost: x\r\nContent-Length: 21\r\n\r\n{\"destination\": \"/d\"}";
        for step in [1, 7, 4096] {
            let r = read_request(&mut Conn::new(raw, step)).unwrap();
            assert_eq!(r.method, "PUT");
            assert_eq!(r.path, "/api/v1/vm.live-update");
            assert_eq!(r.body, "{\"destination\": \"/d\"}");
        }
        let r = read_request(&mut Conn::new(
            b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl\r\nAccept: */*\r\n\r\n",
            5,
        ))
        .unwrap();
        assert_eq!((r.method.as_str(), r.body.as_str()), ("GET", ""));
    }

    #[test]
    fn expect_continue_is_answered_before_the_body() {
        let head = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        // The client waits for the 100 before it sends the body: the head arrives alone.
        let mut c = Conn::new(&[head.as_slice(), b"{}"].concat(), head.len());
        assert_eq!(read_request(&mut c).unwrap().body, "{}");
        assert_eq!(c.output, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn bad_requests_get_a_status() {
        let status = |raw: &[u8]| {
            read_request(&mut Conn::new(raw, 4096))
                .unwrap_err()
                .status()
        };
        assert_eq!(status(b"\x16\x03\x01 not http\r\n\r\n"), Some(400));
        assert_eq!(
            status(b"PUT /x HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status(b"PUT /x HTTP/1.1\r\nContent-Length: 999999\r\n\r\n"),
            Some(413)
        );
        assert_eq!(
            status(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(411)
        );
        let long = [b"GET /".as_slice(), &[b'a'; MAX_HEAD + 10]].concat();
        assert_eq!(status(&long), Some(431));
        // Closed halfway: nothing to answer.
        assert_eq!(
            status(b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}"),
            None
        );
        assert_eq!(status(b"GET /x HTT"), None);
    }

    #[test]
    fn responses_carry_length_and_close() {
        let mut out = Vec::new();
        write_response(&mut out, 200, "{\"a\":1}").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
        let mut out = Vec::new();
        write_response(&mut out, 204, "").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
        );
    }
}
