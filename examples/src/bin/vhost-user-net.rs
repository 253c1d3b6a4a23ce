//! vhost-user-net: a vhost-user network device back-end.
//!
//! Follows QEMU's "Backend program conventions": `--socket-path PATH` or
//! `--fd N`, `--print-capabilities`, no daemonizing, a clear non-zero exit
//! when it cannot start, a clean exit on SIGTERM. Per-queue counters
//! (packets, bytes, drops, errors, the largest frame; the runtime adds
//! calls and kicks per ring) are logged when a front-end leaves.
#![forbid(unsafe_code)]

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use log::{error, info};
use vhost_user_core::backend::BackendConfig;
use vhost_user_core::device::net::{NetConfig, NetDevice, MAX_QUEUE_PAIRS};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_linux::backend::{serve, RuntimeOptions};
use vhost_user_linux::channel::Control;
use vhost_user_linux::sys::socket::Listener;
use vhu_examples::cli::{self, Args};
use vhu_examples::net::{NetBackend, NetService};
use vhu_examples::{logger, signals};

const USAGE: &str = "\
usage: vhost-user-net (--socket-path PATH | --fd N) [options]
       vhost-user-net --print-capabilities

  --socket-path PATH   listen on a Unix socket at PATH
  --fd N               serve on an inherited listening socket fd
  --backend KIND       loopback (what a pair transmits comes back on its
                       receive queue), null (transmitted frames are
                       dropped, receive buffers get a template frame) or
                       tap (frames go to and come from --tap, with
                       checksum and segmentation offloads); default
                       loopback
  --tap NAME           the TAP interface of the tap backend (attached, or
                       created if missing, which needs CAP_NET_ADMIN; a
                       multi_queue tap with several queue pairs)
  --frame-size N       bytes of the null backend's template frame (default 60)
  --mac MAC            the MAC address offered to the driver (aa:bb:cc:dd:ee:ff)
  --mtu N              the MTU offered to the driver, and the largest a
                       front-end may set (NET_SET_MTU)
  --queue-pairs N      queue pairs (default 1)
  --threads T          worker threads serving the queues, 1 to 2N: queue q
                       runs on thread q % T (default: one per queue)
  --queue-size N       largest ring size a front-end may use (default 1024)
  --spin-us N          how long an idle worker polls its rings before it
                       sleeps on their kicks (default 50; a large value
                       keeps a busy-polling worker, as DPDK's back-end)
  --no-mrg-rxbuf       do not offer mergeable receive buffers
  --message-timeout-ms N  a front-end's message, once begun, must arrive
                       whole, and each reply be taken, within this long,
                       or it is disconnected (default 5000; 0: no limit)
  --trust-unsealable-memfd  map guest memory memfds that cannot be sealed
                       against shrinking (DPDK virtio-user without
                       hugepages); a front-end that shrinks one kills the
                       daemon
  --no-in-order        do not offer VIRTIO_F_IN_ORDER
  --log-level LEVEL    off, error, warn, info, debug, trace (default info)
  --print-capabilities print the back-end's capabilities as JSON and exit
";

const FLAGS: &[&str] = &[
    "no-in-order",
    "print-capabilities",
    "help",
    "no-mrg-rxbuf",
    "trust-unsealable-memfd",
];
const OPTIONS: &[&str] = &[
    "no-in-order",
    "socket-path",
    "fd",
    "backend",
    "tap",
    "frame-size",
    "mac",
    "mtu",
    "queue-pairs",
    "threads",
    "queue-size",
    "spin-us",
    "message-timeout-ms",
    "no-mrg-rxbuf",
    "trust-unsealable-memfd",
    "log-level",
    "print-capabilities",
    "help",
];

/// Most queues the daemon serves (32 pairs).
const MAX_QUEUES: usize = 64;
/// Memory slots (GET_MAX_MEM_SLOTS).
const MEM_SLOTS: usize = 32;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-net: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("invalid --mac {s:?}: expected aa:bb:cc:dd:ee:ff");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

fn run() -> Result<(), String> {
    let args = Args::parse(std::env::args().skip(1), FLAGS)?;
    args.check_known(OPTIONS)?;
    if args.flag("help") {
        print!("{USAGE}");
        return Ok(());
    }
    if args.flag("print-capabilities") {
        println!("{{\n  \"type\": \"net\"\n}}");
        return Ok(());
    }
    logger::init(logger::parse_level(
        args.get("log-level").unwrap_or("info"),
    )?);
    let pairs: u16 = args.get_or("queue-pairs", 1)?;
    if pairs == 0 || usize::from(pairs) * 2 > MAX_QUEUES || pairs > MAX_QUEUE_PAIRS {
        return Err(format!("--queue-pairs must be 1 to {}", MAX_QUEUES / 2));
    }
    let num_queues = pairs * 2;
    let queue_size: u16 = args.get_or("queue-size", 1024)?;
    if !(4..=32768).contains(&queue_size) {
        return Err("--queue-size must be 4 to 32768".into());
    }
    let threads: u16 = args.get_or("threads", num_queues)?;
    if threads == 0 || threads > num_queues {
        return Err("--threads must be 1 to twice --queue-pairs".into());
    }
    let mac = args.get("mac").map(parse_mac).transpose()?;
    let mtu: Option<u16> = args
        .get("mtu")
        .map(|m| m.parse().map_err(|_| format!("invalid --mtu {m:?}")))
        .transpose()?;
    let spin = cli::spin(&args)?;
    let frame_size: usize = args.get_or("frame-size", 60)?;
    if !(14..=65535).contains(&frame_size) {
        return Err("--frame-size must be 14 to 65535".into());
    }
    let kind = args.get("backend").unwrap_or("loopback");
    let backend = match (kind, args.get("tap")) {
        ("loopback", None) => NetBackend::Loopback,
        ("null", None) => NetBackend::null(frame_size, mac.unwrap_or([0x52, 0x54, 0, 0, 0, 1])),
        ("tap", Some(name)) => NetBackend::Tap { name: name.into() },
        ("tap", None) => return Err("--backend tap needs --tap NAME".into()),
        ("loopback" | "null", Some(_)) => return Err("--tap is for --backend tap".into()),
        (other, _) => {
            return Err(format!(
                "unknown --backend {other:?} (loopback, null or tap)"
            ))
        }
    };

    if args.get("socket-path").is_some() == args.get("fd").is_some() {
        return Err(format!(
            "exactly one of --socket-path or --fd is required\n{USAGE}"
        ));
    }
    let net = NetConfig {
        mac,
        queue_pairs: pairs,
        mtu,
        mrg_rxbuf: !args.flag("no-mrg-rxbuf"),
        offloads: backend.offloads(),
        ..NetConfig::new()
    };
    let device = NetDevice::new(&net).map_err(|e| format!("invalid device configuration: {e}"))?;
    let features = device.offered_features()
        | V::VERSION_1
        | V::PROTOCOL_FEATURES
        | V::EVENT_IDX
        | V::INDIRECT_DESC
        | V::RING_PACKED;
    // Completions reach the ring in the order the driver made the buffers
    // available (the data plane holds early ones), unless --no-in-order.
    let features = if args.flag("no-in-order") {
        features
    } else {
        features | V::IN_ORDER
    };
    // No INFLIGHT_SHMFD: no front-end of a net device uses it (QEMU asks
    // for an inflight area only for blk and scsi back-ends; DPDK's
    // virtio-user acks MQ, REPLY_ACK and STATUS alone), and the device
    // has nothing for it to recover: it completes in the order it takes
    // chains (transmit at once, receive chains filled oldest first), which
    // IN_ORDER makes a promise, so a front-end that restarts a crashed
    // back-end from the used index, as QEMU does, hands it back exactly
    // the chains that were in flight, in order, without a record per
    // packet.
    let config = BackendConfig {
        features,
        // NET_SET_MTU only with an MTU offered (the driver cannot
        // negotiate VIRTIO_NET_F_MTU otherwise).
        protocol_features: P::MQ
            | P::REPLY_ACK
            | P::CONFIG
            | P::CONFIGURE_MEM_SLOTS
            | P::STATUS
            | P::RESET_DEVICE
            | P::RARP
            | if mtu.is_some() { P::MTU } else { P::empty() },
        num_queues,
        max_queue_size: queue_size,
    };
    info!(
        "serving a {kind} network device, {pairs} queue pair(s), features {:#x}, protocol features {:#x}",
        config.features.bits(),
        config.protocol_features.bits()
    );
    // Before the backend's threads start: they inherit the signal mask,
    // so SIGTERM reaches the thread that removes the socket.
    let socket_path: Option<PathBuf> = args.get("socket-path").map(PathBuf::from);
    signals::exit_cleanly_on_term(move || {
        if let Some(p) = socket_path {
            let _ = std::fs::remove_file(p);
        }
    })
    .map_err(|e| format!("cannot set up signal handling: {e}"))?;
    let service = NetService::new(device, backend)
        .map_err(|e| format!("cannot set up the {kind} backend: {e}"))?;
    if let Some(name) = service.tap_name() {
        info!("attached to tap {name}");
    }
    let listener = match (args.get("socket-path"), args.get("fd")) {
        (Some(path), None) => {
            Listener::bind(path).map_err(|e| format!("cannot listen on {path}: {e}"))?
        }
        (None, Some(fd)) => {
            let fd: RawFd = fd.parse().map_err(|_| format!("invalid --fd {fd:?}"))?;
            if fd < 0 {
                return Err(format!("invalid --fd {fd}"));
            }
            Listener::from_inherited_fd(fd)
                .map_err(|e| format!("--fd {fd} is not a listening socket: {e}"))?
        }
        _ => {
            return Err(format!(
                "exactly one of --socket-path or --fd is required\n{USAGE}"
            ))
        }
    };

    let options = RuntimeOptions {
        threads: usize::from(threads),
        trust_unsealable_memfd: args.flag("trust-unsealable-memfd"),
        message_timeout: match args.get_or("message-timeout-ms", 5000)? {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        },
        spin,
        ..RuntimeOptions::default()
    };
    for line in options.thread_map(num_queues) {
        info!("{line}");
    }
    let stop = AtomicBool::new(false);
    let control = Control::new();
    serve::<_, MAX_QUEUES, MEM_SLOTS>(&listener, config, service, options, &stop, &control).map_err(
        |e| {
            error!("{e}");
            format!("cannot serve: {e}")
        },
    )
}

#[cfg(test)]
mod tests {
    use super::parse_mac;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:ef"),
            Ok([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        assert!(parse_mac("52:54:00:ab:cd").is_err());
        assert!(parse_mac("52:54:00:ab:cd:ef:00").is_err());
        assert!(parse_mac("5:254:00:ab:cd:ef").is_err());
        assert!(parse_mac("zz:54:00:ab:cd:ef").is_err());
    }
}
