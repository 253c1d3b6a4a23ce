//! Guest memory and ring configurations for the tests that drive a
//! daemon with our front-end engine (`FrontendLink`).

use std::os::fd::OwnedFd;
use std::path::Path;

use vhost_user_core::frontend::{FrontendConfig, NotifyMode, QueueConfig, State};
use vhost_user_core::message::MemRegionMsg;
use vhost_user_core::vring::RingAddrs;
use vhost_user_linux::frontend::FrontendLink;
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_linux::sys::eventfd::EventFd;
use vhost_user_linux::sys::memfd;

/// A memfd of `size` bytes as guest RAM at guest address 0 and front-end
/// (user) address `va`, mapped here: the memory, its region for the
/// memory table, and the fd to send with it.
pub fn guest_ram(name: &str, size: u64, va: u64) -> (LinuxGuestMemory, MemRegionMsg, OwnedFd) {
    let fd = memfd::create(name, size).unwrap();
    let region = MemRegionMsg {
        guest_addr: 0,
        size,
        user_addr: va,
        mmap_offset: 0,
        xen: None,
    };
    let mut mem = LinuxGuestMemory::new();
    mem.map(0, region, fd.try_clone().unwrap()).unwrap();
    (mem, region, fd)
}

/// A ring of `size` at guest addresses `a` (sent as user addresses, `va`
/// above them), started at `base`, kicked and called through eventfds.
pub fn queue(size: u16, a: RingAddrs, va: u64, base: u32) -> QueueConfig {
    QueueConfig {
        size,
        addrs: RingAddrs {
            desc: a.desc + va,
            driver: a.driver + va,
            device: a.device + va,
        },
        base,
        kick: NotifyMode::Eventfd,
        call: NotifyMode::Eventfd,
    }
}

/// A link to the daemon at `sock` with `cfg` (its regions' fds in
/// `fds`), a kick and a call eventfd per queue, driven through the
/// handshake and started: every ring runs.
pub fn start<const Q: usize, const R: usize>(
    sock: &Path,
    cfg: FrontendConfig<Q, R>,
    fds: Vec<OwnedFd>,
) -> FrontendLink<Q, R> {
    let n = cfg.queues.len();
    let kicks = (0..n).map(|_| Some(EventFd::new(true).unwrap())).collect();
    let calls = (0..n).map(|_| Some(EventFd::new(true).unwrap())).collect();
    let mut link = FrontendLink::connect(sock, cfg, fds, kicks, calls).unwrap();
    link.drive().unwrap();
    assert_eq!(link.engine().state(), State::Ready);
    link.engine().start().unwrap();
    link.drive().unwrap();
    assert_eq!(link.engine().state(), State::Started);
    link
}
