//! baton-vmm: a KVM VMM front-end. Guest RAM is a shared file mapping so that a second VMM
//! process (live update) and vhost-user back-ends can map it by path.
//!
//! Module map: [`config`] parses options, [`memory`] maps RAM, [`boot`] loads a PVH ELF or bzImage kernel,
//! [`acpi`] writes the firmware tables, [`cpuid`] and [`vcpu`] set up and run vCPUs,
//! [`devices`] emulates the serial console and ACPI registers, [`control`] coordinates
//! pause/resume/exit, [`vm`] ties them together, and [`api`] serves the HTTP API
//! ([`http`]). [`baton_service::access`] decides who may use the VMM's sockets; [`ram_file`] creates or
//! opens the guest RAM file so that no other user can reach it; [`sandbox`] holds each
//! thread kind's seccomp allowlist and the Landlock rules. [`vhost_user`] talks to each
//! device's back-end; [`virtio`] is the transport in front of it; [`reconnect`] brings a
//! back-end back after a restart and [`migration`] moves the VM to a new VMM. [`vfio`] passes
//! host PCI functions through to the guest.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod config;
pub mod console;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod http;
pub mod interrupts;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod pci;
pub mod ram_file;
pub mod reconnect;
pub mod sandbox;
pub mod snapshot;
pub mod vcpu;
pub mod vfio;
pub mod vhost_user;
pub mod virtio;
pub mod vm;
