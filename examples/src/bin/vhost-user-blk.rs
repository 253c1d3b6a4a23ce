//! vhost-user-blk: a vhost-user block device back-end serving a raw image.
//!
//! Follows QEMU's "Backend program conventions": `--socket-path PATH` or
//! `--fd N`, `--print-capabilities`, no daemonizing, a clear non-zero exit
//! when it cannot start, a clean exit on SIGTERM. Without `--blk-file` it
//! serves a sparse temporary image of `--size` bytes, deleted at exit.
#![forbid(unsafe_code)]

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use log::{error, info, warn};
use vhost_user_core::backend::BackendConfig;
use vhost_user_core::device::blk::{BlkConfig, BlkDevice, DiscardLimits, WriteZeroesLimits};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_linux::aio::AioMode;
use vhost_user_linux::backend::{serve, RuntimeOptions};
use vhost_user_linux::channel::Control;
use vhost_user_linux::sys::socket::Listener;
use vhu_examples::blk::{BlkService, BlockBackend, CacheMode, FileBackend, NullBackend, TempImage};
use vhu_examples::cli::{self, parse_size, Args};
use vhu_examples::{logger, signals};

const USAGE: &str = "\
usage: vhost-user-blk (--socket-path PATH | --fd N) [options]
       vhost-user-blk --print-capabilities

  --socket-path PATH   listen on a Unix socket at PATH
  --fd N               serve on an inherited listening socket fd
  --blk-file PATH      raw image to serve (default: a sparse temporary image)
  --size SIZE          size of the temporary image (default 1G)
  --null               no data: reads return zeroes, writes are dropped
  --read-only          refuse writes (offers VIRTIO_BLK_F_RO)
  --cache MODE         none (O_DIRECT), writeback (page cache, the default)
                       or writethrough (page cache, O_DSYNC)
  --aio MODE           io_uring (default; falls back to threads where it
                       cannot be set up), threads (a pool per queue) or
                       sync (one request at a time per queue)
  --io-threads N       at most N I/O threads in all with --aio threads
                       (default 64), started as requests need them and
                       shared by the queues: each may use what the others
                       do not, and gets an even part (and at least one)
                       back as soon as it needs it
  --num-queues N       number of request queues (default 1)
  --threads T          worker threads serving the queues, 1 to N: queue q
                       runs on thread q % T (default: one per queue, at
                       most half the CPUs; all of them with --aio threads
                       --cache none)
  --spin-us N          how long an idle worker polls its rings before it
                       sleeps on their kicks (default 50; not after
                       requests that waited for the disk)
  --queue-size N       largest ring size a front-end may use (default 1024)
  --serial ID          device serial for GET_ID (default vhu-blk)
  --io-delay-us N      delay every request by N microseconds (testing)
  --watch              check the image's size every 500 ms (as SIGHUP does)
  --state-timeout-ms N how long a device state transfer may take before
                       CHECK_DEVICE_STATE fails it (default 30000)
  --no-migration       do not offer live migration: dirty-page logging
                       (LOG_SHMFD, VHOST_F_LOG_ALL) and device state
                       transfer (DEVICE_STATE: the cache mode and the
                       requests suspended in flight), offered by default
  --migration          offer them (the default; kept for scripts)
  --channel-timeout-ms N  wait this long for the front-end's ack of a
                       back-end message before disconnecting (default 5000)
  --message-timeout-ms N  a front-end's message, once begun, must arrive
                       whole, and each reply be taken, within this long,
                       or it is disconnected (default 5000; 0: no limit)
  --no-in-order        do not offer VIRTIO_F_IN_ORDER
  --log-level LEVEL    off, error, warn, info, debug, trace (default info)
  --print-capabilities print the back-end's capabilities as JSON and exit
";

const FLAGS: &[&str] = &[
    "no-in-order",
    "read-only",
    "null",
    "print-capabilities",
    "help",
    "watch",
    "migration",
    "no-migration",
];
const OPTIONS: &[&str] = &[
    "no-in-order",
    "socket-path",
    "fd",
    "blk-file",
    "size",
    "num-queues",
    "threads",
    "spin-us",
    "queue-size",
    "serial",
    "io-delay-us",
    "watch",
    "migration",
    "no-migration",
    "channel-timeout-ms",
    "message-timeout-ms",
    "state-timeout-ms",
    "cache",
    "aio",
    "io-threads",
    "log-level",
    "read-only",
    "null",
    "print-capabilities",
    "help",
];

/// Most queues the daemon serves.
const MAX_QUEUES: usize = 64;
/// Memory slots (GET_MAX_MEM_SLOTS).
const MEM_SLOTS: usize = 32;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-blk: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args = Args::parse(std::env::args().skip(1), FLAGS)?;
    args.check_known(OPTIONS)?;
    if args.flag("help") {
        print!("{USAGE}");
        return Ok(());
    }
    if args.flag("print-capabilities") {
        println!("{{\n  \"type\": \"block\",\n  \"features\": [\n    \"read-only\",\n    \"blk-file\"\n  ]\n}}");
        return Ok(());
    }
    logger::init(logger::parse_level(
        args.get("log-level").unwrap_or("info"),
    )?);
    let num_queues: u16 = args.get_or("num-queues", 1)?;
    let queue_size: u16 = args.get_or("queue-size", 1024)?;
    if num_queues == 0 || usize::from(num_queues) > MAX_QUEUES {
        return Err(format!("--num-queues must be 1 to {MAX_QUEUES}"));
    }
    if !(4..=32768).contains(&queue_size) {
        return Err("--queue-size must be 4 to 32768".into());
    }
    let read_only = args.flag("read-only");
    let cache: CacheMode = args.get("cache").unwrap_or("writeback").parse()?;
    let aio: Option<AioMode> = match args.get("aio").unwrap_or("io_uring") {
        "sync" => None,
        m => Some(m.parse()?),
    };
    // One worker per queue, at most half the machine's CPUs: the rest is
    // the guest's (and its front-end's). Workers that outnumber the cores
    // left to them spin and wake against each other: on two CPUs, two
    // workers for two queues at iodepth 1 cost 2.5x the CPU per request
    // of one worker serving both, for no more IOPS. Not so where every
    // request waits for the disk in a pool thread (--aio threads,
    // --cache none): the workers do not spin, and one with its ring to
    // itself runs a lone request itself (`Aio::run_lone_requests`): one
    // per queue, up to all the CPUs. Measured on two CPUs with 4 KiB
    // random I/O on two queues, 7 alternated runs against one worker:
    // at iodepth 1, 1.11x-1.23x the IOPS at 0.64x-0.69x the CPU per
    // request; at iodepth 2 to 128, 0.96x-1.12x the CPU per request, the
    // same IOPS.
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = if aio == Some(AioMode::Threads) && cache == CacheMode::None {
        cpus
    } else {
        cpus / 2
    };
    let default_threads = u16::try_from(workers.max(1))
        .unwrap_or(u16::MAX)
        .min(num_queues);
    let threads: u16 = args.get_or("threads", default_threads)?;
    let spin = cli::spin(&args)?;
    if threads == 0 || threads > num_queues {
        return Err("--threads must be 1 to --num-queues".into());
    }
    // The queues' pools share one budget, as the one pool of a QEMU
    // AioContext does (a queue busy alone gets all of it), and two busy
    // queues split it: threads past what keeps the file busy add only
    // switches. Measured with 4 KiB O_DIRECT random I/O at iodepth 128 on
    // 2 queues (2 CPUs), 32 threads per queue against 64: 0.85x and 0.94x
    // the CPU per request (reads, writes), the same IOPS.
    let io_threads: usize = args.get_or("io-threads", 64)?;
    if !(1..=4096).contains(&io_threads) {
        return Err("--io-threads must be 1 to 4096".into());
    }

    // Where to listen, before anything is created.
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
    let socket_path: Option<PathBuf> = args.get("socket-path").map(PathBuf::from);

    // The image.
    let mut temp: Option<PathBuf> = None;
    let mut blk_size = 512;
    let backend: Box<dyn BlockBackend> = if args.flag("null") {
        let size = parse_size(args.get("size").unwrap_or("1G"))?;
        Box::new(NullBackend::new(size).with_read_only(read_only))
    } else if let Some(path) = args.get("blk-file") {
        let file = FileBackend::open_with(path, read_only, cache)
            .map_err(|e| format!("cannot open {path}: {e}"))?;
        blk_size = file.logical_block_size();
        Box::new(file)
    } else {
        let size = parse_size(args.get("size").unwrap_or("1G"))?;
        let image =
            TempImage::new(size).map_err(|e| format!("cannot create a temporary image: {e}"))?;
        temp = Some(image.path().to_path_buf());
        let file = FileBackend::open_with(image.path(), read_only, cache)
            .map_err(|e| format!("cannot open the temporary image: {e}"))?;
        blk_size = file.logical_block_size();
        // The image is removed at exit by the cleanup below (and by the
        // TempImage's drop on a normal return).
        std::mem::forget(image);
        Box::new(file)
    };
    let capacity = backend.capacity();
    if capacity < 512 {
        return Err("the image must be at least 512 bytes".into());
    }

    let cleanup_socket = socket_path.clone();
    let cleanup_temp = temp.clone();
    signals::exit_cleanly_on_term(move || {
        if let Some(p) = cleanup_socket {
            let _ = std::fs::remove_file(p);
        }
        if let Some(p) = cleanup_temp {
            let _ = std::fs::remove_file(p);
        }
    })
    .map_err(|e| format!("cannot set up signal handling: {e}"))?;

    let mut blk = BlkConfig::new(capacity / 512);
    blk.blk_size = blk_size;
    blk.num_queues = num_queues;
    blk.read_only = read_only;
    // Data segments per request: leave room for the header and the status
    // descriptors within the ring and the chain capacity.
    blk.seg_max = u32::from(queue_size.min(64)) - 2;
    blk.discard = Some(DiscardLimits {
        max_sectors: u32::MAX >> 9,
        max_seg: 1,
        sector_alignment: 8,
    });
    blk.write_zeroes = Some(WriteZeroesLimits {
        max_sectors: u32::MAX >> 9,
        max_seg: 1,
        may_unmap: true,
    });
    blk.set_serial(args.get("serial").unwrap_or("vhu-blk").as_bytes());
    let device = BlkDevice::new(&blk).map_err(|e| format!("invalid device configuration: {e}"))?;
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
    // Live migration (unless --no-migration): every write into guest
    // memory is logged in the front-end's dirty log, and the device state
    // (the cache mode, the requests suspended in flight) goes to the
    // destination.
    if args.flag("migration") && args.flag("no-migration") {
        return Err("--migration and --no-migration contradict each other".into());
    }
    let migration = !args.flag("no-migration");
    let (features, log) = if migration {
        (features | V::LOG_ALL, P::LOG_SHMFD | P::DEVICE_STATE)
    } else {
        (features, P::empty())
    };
    // Inflight tracking, and stopping rings without draining them (the
    // data plane resubmits recorded requests of rings of any size).
    let inflight = P::INFLIGHT_SHMFD | P::GET_VRING_BASE_INFLIGHT | P::GET_VRING_BASE_SKIP_DRAIN;
    let config = BackendConfig {
        features,
        protocol_features: P::MQ
            | P::REPLY_ACK
            | P::CONFIG
            | P::CONFIGURE_MEM_SLOTS
            | P::STATUS
            | P::RESET_DEVICE
            | P::BACKEND_REQ
            | P::INBAND_NOTIFICATIONS
            | log
            | inflight,
        num_queues,
        max_queue_size: queue_size,
    };
    info!(
        "serving {} bytes ({}, cache={cache:?}, aio={}, {blk_size}-byte blocks), {} queue(s), features {:#x}, protocol features {:#x}",
        capacity,
        if read_only { "read-only" } else { "read-write" },
        aio.map_or("sync", |m| if m == AioMode::Threads { "threads" } else { "io_uring" }),
        num_queues,
        config.features.bits(),
        config.protocol_features.bits()
    );
    let options = RuntimeOptions {
        channel_timeout: std::time::Duration::from_millis(args.get_or("channel-timeout-ms", 5000)?),
        state_timeout: std::time::Duration::from_millis(args.get_or("state-timeout-ms", 30000)?),
        message_timeout: match args.get_or("message-timeout-ms", 5000)? {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        },
        threads: usize::from(threads),
        spin,
        ..RuntimeOptions::default()
    };
    let delay = std::time::Duration::from_micros(args.get_or("io-delay-us", 0)?);
    let service = BlkService::new(device, backend, num_queues)
        .with_delay(delay)
        .with_aio(aio, io_threads)
        .with_lone_requests(&options);
    // A resized image (SIGHUP, or --watch): new capacity, and the
    // front-end is told (BACKEND_CONFIG_CHANGE_MSG).
    let control = Control::new();
    let resize = {
        let (service, control) = (service.clone(), control.clone());
        move || resized(&service, &control)
    };
    signals::on_hangup(resize.clone()).map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
    if args.flag("watch") {
        std::thread::Builder::new()
            .name("vhu-watch".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_millis(500));
                resize();
            })
            .map_err(|e| format!("cannot start the watch thread: {e}"))?;
    }
    for line in options.thread_map(num_queues) {
        info!("{line}");
    }
    let stop = AtomicBool::new(false);
    serve::<_, MAX_QUEUES, MEM_SLOTS>(&listener, config, service, options, &stop, &control)
        .map_err(|e| {
            error!("{e}");
            format!("cannot serve: {e}")
        })?;
    if let Some(p) = temp {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Reads the image's size again; when it changed, tells the front-end.
fn resized<B: vhu_examples::blk::BlockBackend>(service: &BlkService<B>, control: &Control) {
    match service.refresh_capacity() {
        Ok(Some(sectors)) => {
            info!("image resized: {} bytes ({sectors} sectors)", sectors << 9);
            match control.config_changed() {
                Ok(()) => info!("front-end told of the new capacity"),
                Err(e) => warn!("cannot tell the front-end of the new capacity: {e}"),
            }
        }
        Ok(None) => {}
        Err(e) => warn!("cannot read the image's size: {e}"),
    }
}
