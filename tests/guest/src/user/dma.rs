//! Memory for rings and buffers: a bump allocator over RAM after the guest image (identity
//! mapped: physical = virtual). Nothing is freed; each test allocates once.

use core::sync::atomic::{AtomicU64, Ordering};

unsafe extern "C" {
    /// End of the loaded image (linker script).
    static __image_end: u8;
}

/// Start of the allocator's range: the first 2 MiB boundary after the image.
fn heap_start() -> u64 {
    let end = &raw const __image_end as u64;
    (end + (2 << 20) - 1) & !((2 << 20) - 1)
}

static NEXT: AtomicU64 = AtomicU64::new(0);
static LIMIT: AtomicU64 = AtomicU64::new(0);

/// Sets the allocator's limit from the amount of RAM (the top 16 MiB are left alone: the
/// loader may keep the start info, command line or a module there).
pub fn init(ram_bytes: u64) {
    NEXT.store(heap_start(), Ordering::Relaxed);
    let top = ram_bytes.min(3 << 30).saturating_sub(16 << 20);
    LIMIT.store(top.max(heap_start()), Ordering::Relaxed);
}

/// Allocates `size` zeroed bytes aligned to `align` (a power of two); `None` when RAM runs
/// out. Returns the physical (= virtual) address.
pub fn alloc(size: u64, align: u64) -> Option<u64> {
    let next = NEXT.load(Ordering::Relaxed);
    let base = (next + align - 1) & !(align - 1);
    let end = base.checked_add(size)?;
    if end > LIMIT.load(Ordering::Relaxed) {
        return None;
    }
    NEXT.store(end, Ordering::Relaxed);
    // SAFETY: [base, end) is RAM above the image and below the limit, identity mapped and
    // handed out once.
    unsafe { core::ptr::write_bytes(base as *mut u8, 0, usize::try_from(size).ok()?) };
    Some(base)
}
