//! virtio-blk driver over [`Connection`] + [`SplitQueue`]s.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vm_memory::GuestAddress;

use super::frontend::{Connection, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1};
use super::memory::SharedMemory;
use super::virtq::{Buf, SplitQueue};
use super::{DriverError, Result};

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Get ID.
pub const T_GET_ID: u32 = 8;
/// Discard.
pub const T_DISCARD: u32 = 11;
/// Write zeroes.
pub const T_WRITE_ZEROES: u32 = 13;
/// Status OK.
pub const S_OK: u8 = 0;
/// Status IOERR.
pub const S_IOERR: u8 = 1;
/// Status UNSUPP.
pub const S_UNSUPP: u8 = 2;
/// What the driver writes into status bytes before submitting ("not written").
pub const S_UNSET: u8 = 0xff;

/// virtio-blk feature bits the driver acks when offered.
pub const BLK_FEATURES: u64 = (1 << 2) // SEG_MAX
    | (1 << 5) // RO
    | (1 << 6) // BLK_SIZE
    | (1 << 9) // FLUSH
    | (1 << 10) // TOPOLOGY
    | (1 << 11) // CONFIG_WCE
    | (1 << 12) // MQ
    | (1 << 13) // DISCARD
    | (1 << 14) // WRITE_ZEROES
    | F_INDIRECT_DESC
    | F_EVENT_IDX
    | F_VERSION_1;

/// Connection options.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// Queues to set up.
    pub queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// Size of the shared memory.
    pub mem_size: u64,
    /// Largest data buffer per request.
    pub max_io: u32,
    /// Request slots per queue (max requests in flight).
    pub slots: u16,
    /// Virtio features to ack (∩ offered).
    pub features: u64,
    /// Set up an inflight region (GET/SET_INFLIGHT_FD) when offered.
    pub inflight: bool,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            queues: 1,
            queue_size: 256,
            mem_size: 64 << 20,
            max_io: 128 << 10,
            slots: 64,
            features: BLK_FEATURES,
            inflight: true,
        }
    }
}

/// A completed request.
#[derive(Debug, Clone)]
pub struct Done {
    /// Head (chain id).
    pub head: u16,
    /// Status byte as the device wrote it (or [`S_UNSET`]).
    pub status: u8,
    /// `len` of the used element.
    pub used_len: u32,
    /// Data read (device-writable part), when the queue collects data.
    pub data: Vec<u8>,
    /// Caller's tag given at submission.
    pub tag: u64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    hdr: GuestAddress,
    data: GuestAddress,
    status: GuestAddress,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    slot: usize,
    in_len: u32,
    tag: u64,
}

/// One virtio-blk queue of the driver; `Send`, so it can move to its own thread.
#[derive(Debug)]
pub struct BlkQueue {
    /// The virtqueue (raw access for hostile tests).
    pub vq: SplitQueue,
    slots: Vec<Slot>,
    free: Vec<usize>,
    inflight: HashMap<u16, InFlight>,
    ready: Vec<Done>,
    max_io: u32,
    /// Copy read data into [`Done::data`] (benchmarks turn it off).
    pub collect_data: bool,
}

/// A request to submit.
#[derive(Debug, Clone, Copy)]
pub struct Req<'a> {
    /// Request type (`T_*`).
    pub rtype: u32,
    /// Sector.
    pub sector: u64,
    /// Device-readable payload after the header (write data, discard segments).
    pub out: &'a [u8],
    /// Device-writable payload before the status byte (read data, id).
    pub in_len: u32,
}

impl BlkQueue {
    fn new(mem: &Arc<SharedMemory>, index: u16, opts: &BlkOptions) -> Result<Self> {
        let vq = SplitQueue::new(mem.clone(), index, opts.queue_size)?;
        let mut slots = Vec::new();
        for _ in 0..opts.slots {
            let hdr = mem.alloc(16, 16)?;
            let status = mem.alloc(1, 1)?;
            let data = mem.alloc(u64::from(opts.max_io), 4096)?;
            slots.push(Slot { hdr, data, status });
        }
        Ok(Self {
            vq,
            free: (0..slots.len()).rev().collect(),
            slots,
            inflight: HashMap::new(),
            ready: Vec::new(),
            max_io: opts.max_io,
            collect_data: true,
        })
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Builds and publishes a request (no kick). Returns the chain head.
    pub fn submit(&mut self, req: Req<'_>, tag: u64) -> Result<u16> {
        let len = u32::try_from(req.out.len()).unwrap_or(u32::MAX);
        if len.max(req.in_len) > self.max_io {
            return Err(DriverError::Exhausted("slot data space (max_io)"));
        }
        let slot = self
            .free
            .pop()
            .ok_or(DriverError::Exhausted("request slots"))?;
        let s = self.slots[slot];
        let mem = self.vq.memory().clone();
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&req.rtype.to_le_bytes());
        hdr[8..16].copy_from_slice(&req.sector.to_le_bytes());
        mem.write(s.hdr, &hdr)?;
        mem.write(s.status, &[S_UNSET])?;
        let mut bufs = vec![Buf {
            addr: s.hdr,
            len: 16,
            write: false,
        }];
        if !req.out.is_empty() {
            mem.write(s.data, req.out)?;
            bufs.push(Buf {
                addr: s.data,
                len,
                write: false,
            });
        }
        if req.in_len > 0 {
            bufs.push(Buf {
                addr: s.data,
                len: req.in_len,
                write: true,
            });
        }
        bufs.push(Buf {
            addr: s.status,
            len: 1,
            write: true,
        });
        let head = match self.vq.add_chain(&bufs) {
            Ok(h) => h,
            Err(e) => {
                self.free.push(slot);
                return Err(e);
            }
        };
        self.vq.publish(head)?;
        self.inflight.insert(
            head,
            InFlight {
                slot,
                in_len: req.in_len,
                tag,
            },
        );
        Ok(head)
    }

    /// Submits a read or write of `len` bytes using the slot's data buffer as it is (no copy:
    /// for benchmarks). Returns the chain head.
    pub fn submit_io(&mut self, write: bool, sector: u64, len: u32, tag: u64) -> Result<u16> {
        if len > self.max_io {
            return Err(DriverError::Exhausted("slot data space (max_io)"));
        }
        let slot = self
            .free
            .pop()
            .ok_or(DriverError::Exhausted("request slots"))?;
        let s = self.slots[slot];
        let mem = self.vq.memory().clone();
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&(if write { T_OUT } else { T_IN }).to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write(s.hdr, &hdr)?;
        mem.write(s.status, &[S_UNSET])?;
        let bufs = [
            Buf {
                addr: s.hdr,
                len: 16,
                write: false,
            },
            Buf {
                addr: s.data,
                len,
                write: !write,
            },
            Buf {
                addr: s.status,
                len: 1,
                write: true,
            },
        ];
        let head = match self.vq.add_chain(&bufs) {
            Ok(h) => h,
            Err(e) => {
                self.free.push(slot);
                return Err(e);
            }
        };
        self.vq.publish(head)?;
        let in_len = if write { 0 } else { len };
        self.inflight.insert(head, InFlight { slot, in_len, tag });
        Ok(head)
    }

    /// Kicks the device.
    pub fn kick(&self) -> Result<()> {
        self.vq.kick()
    }

    /// Collects completions without waiting.
    pub fn poll(&mut self) -> Vec<Done> {
        let used = self.vq.reap();
        let mut out = std::mem::take(&mut self.ready);
        for u in used {
            out.push(self.finish(u.id, u.len));
        }
        out
    }

    fn finish(&mut self, head: u16, used_len: u32) -> Done {
        let Some(f) = self.inflight.remove(&head) else {
            return Done {
                head,
                status: S_UNSET,
                used_len,
                data: Vec::new(),
                tag: u64::MAX,
            };
        };
        let s = self.slots[f.slot];
        let mem = self.vq.memory();
        let status = mem
            .read(s.status, 1)
            .ok()
            .and_then(|v| v.first().copied())
            .unwrap_or(S_UNSET);
        let data = if self.collect_data && f.in_len > 0 {
            mem.read(s.data, usize::try_from(f.in_len).unwrap_or(0))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        self.free.push(f.slot);
        Done {
            head,
            status,
            used_len,
            data,
            tag: f.tag,
        }
    }

    /// Waits for at least one completion.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<Done>> {
        let got = self.poll();
        if !got.is_empty() {
            return Ok(got);
        }
        let used = self.vq.wait(timeout)?;
        Ok(used.into_iter().map(|u| self.finish(u.id, u.len)).collect())
    }

    /// Submits one request and waits for it (other completions are kept for `poll`).
    pub fn run(&mut self, req: Req<'_>) -> Result<Done> {
        let head = self.submit(req, u64::MAX - 1)?;
        self.kick()?;
        self.wait_head(head, Duration::from_secs(10))
    }

    /// Waits for the completion of chain `head` (submitted with `submit` or raw).
    pub fn wait_head(&mut self, head: u16, timeout: Duration) -> Result<Done> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            for d in self.wait(left)? {
                if d.head == head {
                    return Ok(d);
                }
                self.ready.push(d);
            }
        }
    }

    /// Reads `len` bytes at `sector`.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<(u8, Vec<u8>)> {
        let d = self.run(Req {
            rtype: T_IN,
            sector,
            out: &[],
            in_len: len,
        })?;
        Ok((d.status, d.data))
    }

    /// Writes `data` at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<u8> {
        Ok(self
            .run(Req {
                rtype: T_OUT,
                sector,
                out: data,
                in_len: 0,
            })?
            .status)
    }

    /// Flush.
    pub fn flush(&mut self) -> Result<u8> {
        Ok(self
            .run(Req {
                rtype: T_FLUSH,
                sector: 0,
                out: &[],
                in_len: 0,
            })?
            .status)
    }

    /// GET_ID (20 bytes).
    pub fn get_id(&mut self) -> Result<(u8, Vec<u8>)> {
        let d = self.run(Req {
            rtype: T_GET_ID,
            sector: 0,
            out: &[],
            in_len: 20,
        })?;
        Ok((d.status, d.data))
    }

    /// DISCARD or WRITE_ZEROES with segments (sector, num_sectors, flags).
    pub fn ranges(&mut self, rtype: u32, segs: &[(u64, u32, u32)]) -> Result<u8> {
        let mut out = Vec::new();
        for &(s, n, f) in segs {
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&f.to_le_bytes());
        }
        Ok(self
            .run(Req {
                rtype,
                sector: 0,
                out: &out,
                in_len: 0,
            })?
            .status)
    }
}

/// A connected virtio-blk device.
pub struct BlkDriver {
    conn: Option<Connection>,
    /// Shared memory.
    pub mem: Arc<SharedMemory>,
    /// Queues (take them with `std::mem::take` to use them from threads).
    pub queues: Vec<BlkQueue>,
    /// Capacity in sectors (config space).
    pub capacity: u64,
    /// The inflight region, if set up.
    pub inflight: Option<(VhostUserInflight, File)>,
    opts: BlkOptions,
    protocol: VhostUserProtocolFeatures,
    path: PathBuf,
}

impl std::fmt::Debug for BlkDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDriver")
            .field("conn", &self.conn)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Protocol features the driver asks for.
pub fn wanted_protocol(inflight: bool) -> VhostUserProtocolFeatures {
    let mut p = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE;
    if inflight {
        p |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    p
}

impl BlkDriver {
    /// Connects to the back-end at `path` and starts `opts.queues` queues.
    pub fn connect(path: &Path, opts: BlkOptions) -> Result<Self> {
        let protocol = wanted_protocol(opts.inflight);
        Self::connect_asking(path, opts, protocol)
    }

    /// [`BlkDriver::connect`], asking also for GET_VRING_BASE_INFLIGHT: GET_VRING_BASE
    /// ([`Connection::stop_queue`]) may then leave requests in flight, recorded in the
    /// inflight region, for the next connection ([`BlkDriver::reconnect`]) to get back.
    pub fn connect_suspending(path: &Path, opts: BlkOptions) -> Result<Self> {
        let protocol =
            wanted_protocol(opts.inflight) | VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT;
        Self::connect_asking(path, opts, protocol)
    }

    fn connect_asking(
        path: &Path,
        opts: BlkOptions,
        protocol: VhostUserProtocolFeatures,
    ) -> Result<Self> {
        let mem = Arc::new(SharedMemory::new(opts.mem_size)?);
        let queues = (0..opts.queues)
            .map(|i| BlkQueue::new(&mem, i, &opts))
            .collect::<Result<Vec<_>>>()?;
        let conn = Connection::connect(path, u64::from(opts.queues), opts.features, protocol)?;
        let mut d = Self {
            conn: Some(conn),
            mem,
            queues,
            capacity: 0,
            inflight: None,
            opts,
            protocol,
            path: path.to_path_buf(),
        };
        d.setup(true)?;
        Ok(d)
    }

    /// The vhost-user connection.
    /// Fails only after a failed `reconnect`.
    pub fn conn(&mut self) -> Result<&mut Connection> {
        self.conn
            .as_mut()
            .ok_or(DriverError::Exhausted("connection (reconnect failed)"))
    }

    fn setup(&mut self, fresh: bool) -> Result<()> {
        let conn = self
            .conn
            .as_mut()
            .ok_or(DriverError::Exhausted("connection"))?;
        let cfg = conn.config(0, 60)?;
        self.capacity = cfg
            .get(0..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        conn.set_mem_table(&self.mem)?;
        if self.opts.inflight
            && conn
                .protocol
                .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            match (&self.inflight, fresh) {
                (Some((info, file)), false) => conn.set_inflight(info, file)?,
                _ => {
                    self.inflight =
                        Some(conn.setup_inflight(self.opts.queues, self.opts.queue_size)?)
                }
            }
        }
        for q in &self.queues {
            // Resume where the device left the used ring (QEMU's choice without inflight).
            let base = if fresh { 0 } else { q.vq.device_used_idx() };
            conn.start_queue(&q.vq, base)?;
        }
        Ok(())
    }

    /// Drops the connection and connects again (same memory, rings and inflight region);
    /// every queue resumes at the device's used index.
    pub fn reconnect(&mut self) -> Result<()> {
        self.conn = None; // hang up first: the back-end serves one front-end at a time
        let conn = Connection::connect(
            &self.path,
            u64::from(self.opts.queues),
            self.opts.features,
            self.protocol,
        )?;
        self.conn = Some(conn);
        self.setup(false)
    }

    /// Queue `i`.
    pub fn queue(&mut self, i: usize) -> &mut BlkQueue {
        &mut self.queues[i]
    }
}
