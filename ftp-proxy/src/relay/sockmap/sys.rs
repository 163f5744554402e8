//! The three socket calls the kernel relay needs and no safe wrapper
//! (rustix, socket2) offers: the total a TCP socket has been given to send
//! (`TCP_INFO`'s `tcpi_bytes_acked` plus `SIOCOUTQ`), and `SO_RCVLOWAT`
//! (whose setting makes the kernel run the socket's `data_ready`, see
//! [`wake_receiver`]). The only unsafe code of the daemon.
//!
//! Owns nothing else: the relay decides what the numbers mean.

#![allow(
    unsafe_code,
    reason = "getsockopt(TCP_INFO), ioctl(SIOCOUTQ) and setsockopt(SO_RCVLOWAT) have no safe wrapper"
)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Bytes ever queued for sending on a TCP socket: acknowledged ones plus
/// the ones still in its send queue. Read in two calls, acknowledged first:
/// an acknowledgment between them makes the sum smaller than the truth,
/// never larger, so a caller waiting for a total waits a little longer at
/// worst.
pub(super) fn bytes_queued(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>())
        .map_err(|_| io::Error::other("tcp_info does not fit a socklen_t"))?;
    // SAFETY: `info` is a writable, zeroed `tcp_info` of `len` bytes; the
    // kernel writes at most `len` bytes and says how many in `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised above and partly written by the kernel: every
    // bit pattern of this all-integer struct is valid.
    let info = unsafe { info.assume_init() };
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int to the pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info
        .tcpi_bytes_acked
        .saturating_add(u64::try_from(outq).unwrap_or(0)))
}

/// Sets `SO_RCVLOWAT` to 1: the kernel then runs the socket's
/// `data_ready` when anything is queued (`tcp_set_rcvlowat`), which for a
/// socket under a stream verdict means: judge what arrived before the
/// socket was inserted.
pub(super) fn wake_receiver(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(|_| io::Error::other("int does not fit a socklen_t"))?;
    // SAFETY: a readable int of `len` bytes.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
