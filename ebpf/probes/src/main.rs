//! sonde's kernel side: syscall tracepoints (and one raw tracepoint on every syscall's exit) that copy socket payloads into a ring buffer, and
//! process lifecycle tracepoints that keep the PID filter current.
//!
//! Every hook does the PID filter first; a process that is not traced costs one array read.
//! Copies are bounded by `MAX_CAPTURE`. Nothing is parsed here.
#![no_std]
#![no_main]

mod data;
mod exit;
mod floor;
mod inject;
mod lifecycle;
mod logs;
mod maps;
mod tls;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
