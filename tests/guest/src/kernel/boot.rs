//! PVH entry, page tables, GDT, per-CPU TSS and the AP trampoline, all in assembly.
//!
//! Boot path of the bootstrap CPU (BSP): `pvh_start32` (32-bit, paging off, EBX = physical
//! address of `hvm_start_info`) → `common32` (CR3, CR4.PAE, EFER.LME, CR0.PG) → far jump to
//! `entry64` → TSS descriptor, `ltr`, LAPIC enable → `iretq` to `user_entry(cpu, start_info)`
//! at CPL3. Application processors (APs) start in real mode at [`AP_TRAMPOLINE`] and join
//! the same path at `ap_entry32` with the CPU index the BSP stored for their APIC id in
//! [`CPU_INDEX_BY_APIC`].
//!
//! The page tables are assembled at build time: an identity map of the first 4 GiB with
//! 2 MiB pages, user-accessible (U/S set) and writable, the top GiB (LAPIC, IOAPIC, PCI
//! holes) uncached. Nothing is built at run time, so the emulated CPL0 path stays short.
//!
//! [`AP_TRAMPOLINE`]: super::AP_TRAMPOLINE

use core::sync::atomic::AtomicU8;

use super::MAX_CPUS;

/// Size of each CPU's kernel stack (used for traps and system calls).
pub const KSTACK_SIZE: usize = 16 * 1024;
/// Size of each CPU's user stack.
pub const USTACK_SIZE: usize = 64 * 1024;
/// Bytes per TSS: the 104-byte 64-bit TSS, an 8 KiB I/O permission bitmap and padding.
pub const TSS_STRIDE: usize = 8320;
/// Offset of the I/O permission bitmap inside a TSS.
pub const IOMAP_OFFSET: usize = 104;

/// CPU index of each AP by local APIC id, written by the BSP before it sends the SIPIs;
/// an AP reads its own entry in `ap_entry32` (so APs can start in parallel without locks).
#[unsafe(no_mangle)]
pub static CPU_INDEX_BY_APIC: [AtomicU8; 256] = [const { AtomicU8::new(0) }; 256];

/// TSC value read at the very first guest instruction (PVH entry).
#[unsafe(no_mangle)]
pub static mut BOOT_TSC: u64 = 0;

#[repr(C, align(16))]
struct Stacks<const N: usize>([[u8; N]; MAX_CPUS]);

/// Per-CPU kernel stacks.
#[unsafe(no_mangle)]
static mut KSTACKS: Stacks<KSTACK_SIZE> = Stacks([[0; KSTACK_SIZE]; MAX_CPUS]);
/// Per-CPU user stacks.
#[unsafe(no_mangle)]
static mut USTACKS: Stacks<USTACK_SIZE> = Stacks([[0; USTACK_SIZE]; MAX_CPUS]);

/// Per-CPU TSSes. The I/O bitmaps are all zero, so CPL3 may use every port: a test guest
/// needs no isolation, only the ability to drive devices natively from CPL3.
#[repr(C, align(64))]
struct Tsses([[u8; TSS_STRIDE]; MAX_CPUS]);
#[unsafe(no_mangle)]
static mut TSS: Tsses = Tsses([[0; TSS_STRIDE]; MAX_CPUS]);

/// The interrupt descriptor table: 256 16-byte gates, filled by [`super::tables::init_idt`].
#[repr(C, align(4096))]
pub struct Idt(pub [[u64; 2]; 256]);
/// The IDT itself (loaded by `entry64`, filled from CPL3).
#[unsafe(no_mangle)]
pub static mut IDT: Idt = Idt([[0; 2]; 256]);

core::arch::global_asm!(
    r#"

    /* ---- PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18) ---- */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4
    .popsection

    /* ---- GDT ---- */
    .pushsection .data.gdt, "aw"
    .balign 16
    .globl GDT
GDT:
    .quad 0                         /* 0x00 null */
    .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cff2000000ffff        /* 0x18 user data (DPL 3) */
    .quad 0x00affa000000ffff        /* 0x20 user code, 64-bit (DPL 3) */
    .quad 0x00cf9a000000ffff        /* 0x28 kernel code, 32-bit (AP trampoline) */
    .fill {max_cpus} * 2, 8, 0      /* 0x30 + 16*cpu: TSS descriptors, written by entry64 */
GDT_END:
    .balign 16
GDTR:
    .word GDT_END - GDT - 1
    .quad GDT
IDTR:
    .word 4095
    .quad {idt}
    .popsection

    /* ---- Page tables: identity map of 0..4 GiB with 2 MiB pages ---- */
    .pushsection .data.pagetables, "aw"
    .balign 4096
    .globl PML4
PML4:
    .quad PDPT + 0x7                /* present, writable, user */
    .fill 511, 8, 0
PDPT:
    .quad PD + 0x0000 + 0x7
    .quad PD + 0x1000 + 0x7
    .quad PD + 0x2000 + 0x7
    .quad PD + 0x3000 + 0x7
    .fill 508, 8, 0
PD:
    .set pd_i, 0
    .rept 1536                      /* 0..3 GiB: RAM, write-back */
    .quad (pd_i << 21) + 0x87       /* present, writable, user, 2 MiB page */
    .set pd_i, pd_i + 1
    .endr
    .rept 512                       /* 3..4 GiB: MMIO hole, uncached */
    .quad (pd_i << 21) + 0x9f       /* ... plus PWT and PCD */
    .set pd_i, pd_i + 1
    .endr
    .popsection

    /* ---- 32-bit entry (BSP from PVH, APs from the trampoline) ---- */
    .pushsection .text.boot, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    rdtsc
    mov %eax, BOOT_TSC
    mov %edx, BOOT_TSC + 4
    mov %ebx, %esi                  /* hvm_start_info */
    xor %edi, %edi                  /* cpu index 0 */
    lgdt GDTR
    jmp common32

    .globl ap_entry32
ap_entry32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov 0xfee00020, %edi            /* local APIC id (paging is off: physical) */
    shr $24, %edi
    movzbl CPU_INDEX_BY_APIC(%edi), %edi
    xor %esi, %esi

common32:
    mov $PML4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                  /* PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx           /* EFER */
    rdmsr
    or $0x100, %eax                 /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax            /* PG | PE */
    mov %eax, %cr0
    .byte 0xea                      /* ljmp $0x08, $entry64 */
    .long entry64
    .word 0x08

    /* ---- 64-bit entry: edi = cpu index, esi = start info (BSP) ---- */
    .code64
entry64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %edi, %edi
    mov %esi, %esi
    lidt IDTR(%rip)

    /* kernel stack top = KSTACKS + (cpu + 1) * KSTACK_SIZE */
    lea 1(%rdi), %rsp
    imul ${kstack}, %rsp, %rsp
    lea {kstacks}(%rip), %rax
    add %rax, %rsp

    /* rax = this CPU's TSS; set RSP0 and the I/O bitmap offset */
    imul ${tss_stride}, %rdi, %rax
    lea {tss}(%rip), %rcx
    add %rcx, %rax
    mov %rsp, 4(%rax)
    movw ${iomap}, 102(%rax)

    /* TSS descriptor: limit | base[23:0] << 16 | type 0x89 << 40 | base[31:24] << 56 */
    mov %rax, %rdx
    shl $16, %rdx
    movabs $0x000000ffffff0000, %rcx
    and %rcx, %rdx
    shr $24, %rax
    shl $56, %rax
    or %rax, %rdx
    movabs $(0x0000890000000000 + {iomap} + 8192), %rcx
    or %rcx, %rdx
    mov %rdi, %rcx
    shl $4, %rcx
    lea GDT + 0x30(%rip), %rax
    mov %rdx, (%rax, %rcx)
    add $0x30, %ecx
    ltr %cx

    /* Local APIC: enable (spurious vector 0xff), timer one-shot on vector 0x20, divide by 1 */
    mov $0xfee000f0, %eax
    movl $0x1ff, (%rax)
    movl $0x20, 0x230(%rax)
    movl $0x0b, 0x2f0(%rax)

    /* Mask the legacy PICs (firmware may have left IRQ0 unmasked on vector 8). */
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1

    /* iretq to user_entry(cpu, start_info) on this CPU's user stack */
    lea 1(%rdi), %rax
    imul ${ustack}, %rax, %rax
    lea {ustacks}(%rip), %rcx
    lea -8(%rax, %rcx), %rax
    pushq $0x1b
    push %rax
    pushq $0x202
    pushq $0x23
    lea {user_entry}(%rip), %rax
    push %rax
    iretq

    /* ---- AP real-mode trampoline, copied to 0x8000 (SIPI vector 0x08) ---- */
    .balign 16
    .globl ap_tramp_start
    .globl ap_tramp_end
    .code16
ap_tramp_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl ap_tramp_gdtr - ap_tramp_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x28, $ap_entry32
    .balign 8
ap_tramp_gdtr:
    .word GDT_END - GDT - 1
    .long GDT
ap_tramp_end:
    .code64
    .popsection
    "#,
    max_cpus = const MAX_CPUS,
    idt = sym IDT,
    kstack = const KSTACK_SIZE,
    kstacks = sym KSTACKS,
    ustack = const USTACK_SIZE,
    ustacks = sym USTACKS,
    tss_stride = const TSS_STRIDE,
    tss = sym TSS,
    iomap = const IOMAP_OFFSET,
    user_entry = sym crate::user::user_entry,
    options(att_syntax),
);

unsafe extern "C" {
    /// First byte of the AP trampoline in the image.
    static ap_tramp_start: u8;
    /// One past the last byte of the AP trampoline.
    static ap_tramp_end: u8;
}

/// The AP real-mode trampoline's bytes, to be copied to [`super::AP_TRAMPOLINE`].
pub fn ap_trampoline() -> &'static [u8] {
    let start = &raw const ap_tramp_start;
    let end = &raw const ap_tramp_end;
    let len = end as usize - start as usize;
    // SAFETY: both symbols delimit one contiguous range of the loaded, immutable image.
    unsafe { core::slice::from_raw_parts(start, len) }
}
