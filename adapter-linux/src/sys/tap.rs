//! TAP interfaces: a Linux network interface whose frames a process
//! reads and writes through `/dev/net/tun`, each with a virtio-net header
//! in front (`IFF_VNET_HDR`), so offloads (partial checksums, TSO) pass
//! between the guest and the host's stack untouched.
//!
//! A [`Tap`] is one queue of the interface: the fd is non-blocking;
//! [`Tap::wait_readable`] sleeps until a frame is there. With
//! `multi_queue` (`IFF_MULTI_QUEUE`) several [`Tap`]s of one name are the
//! interface's queues, and the kernel spreads the host's frames over them
//! by flow.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use super::{cvt, retry};

/// Bytes of an interface name, with its NUL (`IFNAMSIZ`).
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the
/// rest of the 40-byte union unused).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}
const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

/// `struct ifreq` as SIOCSIFMTU reads it: the name, then
/// the MTU.
#[repr(C)]
struct IfMtu {
    name: [u8; IFNAMSIZ],
    mtu: libc::c_int,
    _pad: [u8; 20],
}
const _: () = assert!(std::mem::size_of::<IfMtu>() == 40);

/// `ifr_name` for `name`, NUL-padded (a name of IFNAMSIZ bytes or more is
/// cut to leave its NUL; `Tap::open` refuses those).
fn ifr_name(name: &str) -> [u8; IFNAMSIZ] {
    let mut b = [0; IFNAMSIZ];
    let n = name.len().min(IFNAMSIZ - 1);
    b[..n].copy_from_slice(&name.as_bytes()[..n]);
    b
}

/// `TUN_F_*` offload flags for [`Tap::set_offload`]: which offloaded
/// frames the tap may hand to the reader.
pub mod offload {
    /// Frames with a partial checksum.
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    /// TCP over IPv4 segmentation (needs [`CSUM`]).
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    /// TCP over IPv6 segmentation (needs [`CSUM`]).
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    /// TSO with ECN (needs [`TSO4`] or [`TSO6`]).
    pub const TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
    /// UDP fragmentation offload (needs [`CSUM`]).
    pub const UFO: u32 = libc::TUN_F_UFO;
}

/// One queue of a TAP interface, with virtio-net headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the TAP interface `name` (creating it, which needs
    /// CAP_NET_ADMIN, if it does not exist): `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`, and `IFF_MULTI_QUEUE` if `multi_queue` (every queue
    /// of a multi-queue interface is one such attach). The fd is
    /// non-blocking and close-on-exec. Errors say what went wrong in
    /// words (no `/dev/net/tun`, no permission, flags that do not match
    /// an existing interface, an interface in use).
    pub fn open(name: &str, multi_queue: bool) -> io::Result<Tap> {
        if name.is_empty()
            || name.len() >= IFNAMSIZ
            || name
                .bytes()
                .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface name {name:?} (1 to 15 bytes, no '/' or spaces)"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(|e| {
                let what = match e.kind() {
                    io::ErrorKind::NotFound => "no /dev/net/tun (is the tun module loaded?)",
                    io::ErrorKind::PermissionDenied => "no permission to open /dev/net/tun",
                    _ => "cannot open /dev/net/tun",
                };
                io::Error::new(e.kind(), format!("{what}: {e}"))
            })?;
        let mut req = IfReq {
            name: ifr_name(name),
            flags: 0,
            _pad: [0; 22],
        };
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        // The flags all fit in 16 bits (the kernel's ifr_flags is a short).
        req.flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one
        // (40 bytes, name NUL-terminated) and lives across the call.
        let r = cvt(unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETIFF,
                std::ptr::from_mut(&mut req),
            )
        });
        if let Err(e) = r {
            let what = match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => format!(
                    "no permission to attach to tap {name:?} (needs CAP_NET_ADMIN, or a \
                     persistent tap owned by this user)"
                ),
                Some(libc::EINVAL) => format!(
                    "tap {name:?} cannot be attached with these flags (an existing interface \
                     that is not a tap, or whose multi-queue flag differs: {})",
                    if multi_queue {
                        "several queue pairs need a multi_queue tap"
                    } else {
                        "one queue pair needs a tap without multi_queue"
                    }
                ),
                Some(libc::EBUSY) => format!("tap {name:?} is in use by another process"),
                _ => format!("cannot attach to tap {name:?}"),
            };
            return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
        }
        let end = req.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        Ok(Tap { file, name })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// TUNSETVNETHDRSZ: the virtio-net header in front of each frame, both
    /// ways, is `len` bytes (10, or 12 with `num_buffers`).
    pub fn set_vnet_hdr_len(&self, len: usize) -> io::Result<()> {
        let len =
            libc::c_int::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer; `len`
        // lives across the call.
        cvt(unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETVNETHDRSZ,
                std::ptr::from_ref(&len),
            )
        })?;
        Ok(())
    }

    /// TUNSETOFFLOAD: the offloaded frames ([`offload`] flags) the tap may
    /// hand to the reader; the kernel refuses TSO without CSUM.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned
        // long); no memory is passed.
        cvt(unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        })?;
        Ok(())
    }

    /// SIOCSIFMTU: sets the interface's MTU (the host side's; needs
    /// CAP_NET_ADMIN). The kernel refuses one outside the tap's range
    /// (68 to 65521).
    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        self.mtu_ioctl(libc::SIOCSIFMTU, libc::c_int::from(mtu))
            .map(drop)
    }

    /// SIOCGIFMTU: the interface's MTU.
    pub fn mtu(&self) -> io::Result<u16> {
        let mtu = self.mtu_ioctl(libc::SIOCGIFMTU, 0)?;
        u16::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
    }

    /// An MTU ioctl (`struct ifreq` with an int) on the interface;
    /// returns the int the kernel left in it.
    fn mtu_ioctl(&self, request: libc::Ioctl, mtu: libc::c_int) -> io::Result<libc::c_int> {
        let mut req = IfMtu {
            name: ifr_name(&self.name),
            mtu,
            _pad: [0; 20],
        };
        // The ioctl goes through a datagram socket of the calling
        // thread's network namespace, the tap's (the tap's own fd takes no
        // interface ioctls).
        // SAFETY: socket() takes no pointers.
        let fd =
            cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: `fd` is the new socket, owned by nobody else, so
        // `OwnedFd` may take it (and close it).
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: SIOCSIFMTU and SIOCGIFMTU read and write a `struct
        // ifreq` (the name, then an int); `req` is one, 40 bytes with the
        // name NUL-terminated, and lives across the call.
        cvt(unsafe { libc::ioctl(sock.as_raw_fd(), request, std::ptr::from_mut(&mut req)) })?;
        Ok(req.mtu)
    }

    /// Reads one frame with its header into `buf` (a frame longer than
    /// `buf` is cut). [`io::ErrorKind::WouldBlock`] when none is there.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        retry(|| (&self.file).read(buf))
    }

    /// Writes one frame: its header `hdr` (the length set with
    /// [`set_vnet_hdr_len`](Self::set_vnet_hdr_len)) and its bytes.
    pub fn write(&self, hdr: &[u8], frame: &[u8]) -> io::Result<()> {
        let parts = [IoSlice::new(hdr), IoSlice::new(frame)];
        let n = retry(|| (&self.file).write_vectored(&parts))?;
        if n == hdr.len() + frame.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to the tap",
            ))
        }
    }

    /// Sleeps until a frame can be read or `timeout` passed; returns
    /// whether one can.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is one valid pollfd, writable during the call.
        let n = retry(|| cvt(unsafe { libc::poll(&mut pfd, 1, ms) }))?;
        Ok(n > 0 && pfd.revents & libc::POLLIN != 0)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
