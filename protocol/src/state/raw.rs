//! Byte containers for KVM structures in the state stream, written as hex strings.
//!
//! KVM's save/restore ioctls exchange `#[repr(C)]` plain-data structures whose layout is part
//! of the kernel ABI. [`Raw<T>`] carries one such structure as its exact bytes, converted with
//! `zerocopy` (no `unsafe` here); [`Blob`] carries a variable-length byte string. Both encode
//! as lowercase hex in JSON, half the size of a number array and faster to parse. A `Raw<T>`
//! that decodes always has exactly `size_of::<T>()` bytes: unlike kvm-bindings' own serde,
//! which zero-pads short input, a short or long value is a decode error.

use std::fmt;
use std::marker::PhantomData;

use kvm_bindings::kvm_fpu;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes};

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn from_hex<E: de::Error>(s: &str) -> Result<Vec<u8>, E> {
    fn nibble<E: de::Error>(c: u8) -> Result<u8, E> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(E::custom(format_args!(
                "invalid hex digit {:?}",
                char::from(c)
            ))),
        }
    }
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return Err(E::custom("hex string has an odd number of digits"));
    }
    b.chunks_exact(2)
        .map(|pair| match *pair {
            [hi, lo] => Ok((nibble::<E>(hi)? << 4) | nibble::<E>(lo)?),
            _ => Err(E::custom("hex string has an odd number of digits")),
        })
        .collect()
}

struct HexVisitor;

impl Visitor<'_> for HexVisitor {
    type Value = Vec<u8>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a hex string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
        from_hex(v)
    }
}

/// A variable-length byte string, written as hex.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl Blob {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Copies the bytes of a plain-data value, e.g. a `kvm_xsave`.
    pub fn of<T: IntoBytes + Immutable>(v: &T) -> Self {
        Blob(v.as_bytes().to_vec())
    }

    /// Builds a `T` from the start of the blob, zero-filling when the blob is shorter.
    /// Validation has already checked lengths where it matters.
    pub fn read<T: FromBytes + IntoBytes>(&self) -> T {
        let mut v = T::new_zeroed();
        for (d, s) in v.as_mut_bytes().iter_mut().zip(&self.0) {
            *d = *s;
        }
        v
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "Blob({} bytes: {})", self.0.len(), to_hex(&self.0))
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(HexVisitor).map(Blob)
    }
}

/// Exactly the bytes of one KVM plain-data structure `T` (`kvm_regs`, `kvm_lapic_state`, ...).
///
/// ```
/// use baton_protocol::state::Raw;
/// use kvm_bindings::kvm_regs;
/// let regs = kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() };
/// let raw = Raw::new(&regs);
/// let json = serde_json::to_string(&raw).unwrap();
/// let back: Raw<kvm_regs> = serde_json::from_str(&json).unwrap();
/// assert_eq!(back.get().rip, 0x1000);
/// // A value of the wrong size does not decode.
/// assert!(serde_json::from_str::<Raw<kvm_regs>>("\"00\"").is_err());
/// ```
pub struct Raw<T> {
    bytes: Vec<u8>,
    kind: PhantomData<fn() -> T>,
}

impl<T> Raw<T> {
    /// The structure's bytes (always `size_of::<T>()` of them).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Wraps bytes, which must be exactly `size_of::<T>()` long.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        (bytes.len() == std::mem::size_of::<T>()).then(|| Raw {
            bytes: bytes.to_vec(),
            kind: PhantomData,
        })
    }
}

impl<T: IntoBytes + Immutable> Raw<T> {
    /// Copies the bytes of `v`.
    pub fn new(v: &T) -> Self {
        Raw {
            bytes: v.as_bytes().to_vec(),
            kind: PhantomData,
        }
    }
}

impl<T: FromBytes + IntoBytes> Raw<T> {
    /// Rebuilds the structure.
    pub fn get(&self) -> T {
        let mut v = T::new_zeroed();
        for (d, s) in v.as_mut_bytes().iter_mut().zip(&self.bytes) {
            *d = *s;
        }
        v
    }
}

impl<T: FromBytes + IntoBytes> Default for Raw<T> {
    /// An all-zero structure.
    fn default() -> Self {
        Raw {
            bytes: vec![0; std::mem::size_of::<T>()],
            kind: PhantomData,
        }
    }
}

impl<T> Clone for Raw<T> {
    fn clone(&self) -> Self {
        Raw {
            bytes: self.bytes.clone(),
            kind: PhantomData,
        }
    }
}

impl<T> PartialEq for Raw<T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl<T> Eq for Raw<T> {}

impl<T> fmt::Debug for Raw<T> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let name = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("?");
        write!(f, "Raw<{name}>({})", to_hex(&self.bytes))
    }
}

impl<T> Serialize for Raw<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(&self.bytes))
    }
}

impl<'de, T> Deserialize<'de> for Raw<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = d.deserialize_str(HexVisitor)?;
        let want = std::mem::size_of::<T>();
        if bytes.len() != want {
            return Err(de::Error::invalid_length(
                bytes.len(),
                &format!("{want} bytes of {}", std::any::type_name::<T>()).as_str(),
            ));
        }
        Ok(Raw {
            bytes,
            kind: PhantomData,
        })
    }
}

/// `kvm_fpu`, field by field (kvm-bindings gives it no serde and no zerocopy traits).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers ST0-ST7, 80 bits each padded to 16 bytes.
    pub fpr: [[u8; 16]; 8],
    /// x87 control word.
    pub fcw: u16,
    /// x87 status word.
    pub fsw: u16,
    /// Abridged x87 tag word.
    pub ftwx: u8,
    /// Last x87 opcode.
    pub last_opcode: u16,
    /// Last x87 instruction pointer.
    pub last_ip: u64,
    /// Last x87 data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15.
    pub xmm: [[u8; 16]; 16],
    /// SSE control/status register.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_lapic_state, kvm_sregs, kvm_xsave};

    #[test]
    fn hex_round_trip_all_byte_values() {
        let all: Vec<u8> = (0..=255).collect();
        let s = to_hex(&all);
        assert_eq!(s.len(), 512);
        assert_eq!(from_hex::<serde_json::Error>(&s).unwrap(), all);
        assert_eq!(
            from_hex::<serde_json::Error>(&s.to_uppercase()).unwrap(),
            all
        );
        assert!(from_hex::<serde_json::Error>("abc").is_err());
        assert!(from_hex::<serde_json::Error>("zz").is_err());
        assert!(from_hex::<serde_json::Error>("é0").is_err());
    }

    #[test]
    fn raw_round_trips_kvm_structs() {
        let mut sregs = kvm_sregs {
            cr0: 0x8000_0011,
            efer: 0xd01,
            ..Default::default()
        };
        sregs.cs.selector = 0x10;
        let raw = Raw::new(&sregs);
        assert_eq!(raw.as_bytes().len(), std::mem::size_of::<kvm_sregs>());
        let json = serde_json::to_string(&raw).unwrap();
        let back: Raw<kvm_sregs> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.get(), sregs);

        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 5;
        let back: Raw<kvm_lapic_state> =
            serde_json::from_str(&serde_json::to_string(&Raw::new(&lapic)).unwrap()).unwrap();
        assert_eq!(back.get().regs[0x20], 5);
    }

    #[test]
    fn raw_rejects_wrong_length_and_non_strings() {
        let long = format!("\"{}\"", "00".repeat(std::mem::size_of::<kvm_sregs>() + 1));
        assert!(serde_json::from_str::<Raw<kvm_sregs>>(&long).is_err());
        assert!(serde_json::from_str::<Raw<kvm_sregs>>("[1,2,3]").is_err());
        assert!(Raw::<kvm_sregs>::from_bytes(&[0; 3]).is_none());
        assert!(Raw::<kvm_sregs>::from_bytes(&[0; std::mem::size_of::<kvm_sregs>()]).is_some());
    }

    #[test]
    fn blob_reads_xsave() {
        let mut xs = kvm_xsave::default();
        xs.region[0] = 0x37f;
        xs.region[1023] = 9;
        let blob = Blob::of(&xs);
        assert_eq!(blob.len(), 4096);
        let back: Blob = serde_json::from_str(&serde_json::to_string(&blob).unwrap()).unwrap();
        let xs2: kvm_xsave = back.read();
        assert_eq!(xs2.region[0], 0x37f);
        assert_eq!(xs2.region[1023], 9);
    }

    #[test]
    fn fpu_round_trip() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        f.xmm[3][7] = 0xaa;
        f.fpr[7][9] = 0x55;
        let s = FpuState::from(&f);
        let json = serde_json::to_string(&s).unwrap();
        let back: FpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(kvm_fpu::from(&back), f);
    }
}
