//! `vhu`: a vhost-user front-end tool.
//!
//! `vhu probe --socket-path S [--json]` connects to any vhost-user back-end
//! and prints what it offers: virtio and protocol features by name, queue
//! count, memory slots and, where CONFIG is offered, the config space
//! (decoded as virtio-blk when it has a virtio-blk config's size).
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use vhost_user_core::feature::{ProtocolFeatures, VirtioFeatures};
use vhost_user_linux::frontend::{FrontendLink, Probe};
use vhu_examples::cli::Args;

const USAGE: &str = "\
usage: vhu probe --socket-path PATH [--device blk|net] [--json]
       vhu bench --socket-path PATH [--rw read|write|randread|randwrite|randrw]
                 [--bs 4096] [--iodepth 1] [--queues 1]
                 [--runtime SECONDS | --requests N] [--poll] [--verify]
                 [--packed] [--reconnect] [--inband] [--timeout SECONDS]
                 [--json] [--flush-every N] [--no-guest-features]
                 [--in-order]
                 [--buffer-offset N]
                 [--migrate-every SECONDS --to PATH [--message-45]]

  probe    connect to a vhost-user back-end and print its features,
           protocol features, queue count, memory slots and config space
  bench    load a vhost-user-blk back-end and report IOPS, MB/s, latency
           percentiles and notifications per request; --packed uses packed
           rings (split by default); --reconnect survives
           the back-end's restarts through its inflight area; --timeout
           (default 30) fails a run in which nothing completes that long;
           --inband kicks with VRING_KICK messages and takes calls as
           BACKEND_VRING_CALL messages (INBAND_NOTIFICATIONS), no eventfds;
           it negotiates what a Linux guest does (FLUSH, CONFIG_WCE,
           SEG_MAX, BLK_SIZE, MQ) unless --no-guest-features (then the
           device is writethrough); --in-order negotiates IN_ORDER
           where offered (QEMU leaves it off unless asked); --flush-every N sends a FLUSH after
           every N writes; --buffer-offset N misaligns the data buffers;
           --migrate-every moves the running load between this back-end
           and the one at --to, back and forth: rings stopped without
           draining (GET_VRING_BASE_INFLIGHT, or message 45 with
           --message-45), device state saved and loaded, requests in
           flight resubmitted by the destination; the source logs dirty
           pages meanwhile (LOG_SHMFD, VHOST_F_LOG_ALL), read and checked
           at each switch (both offer DEVICE_STATE and dirty logging:
           vhost-user-blk does unless --no-migration); a state that does
           not move (refused at either end) resumes the source
";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhu: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args = Args::parse(
        std::env::args().skip(1),
        &[
            "json",
            "help",
            "poll",
            "verify",
            "reconnect",
            "packed",
            "inband",
            "no-guest-features",
            "in-order",
            "message-45",
        ],
    )?;
    if args.flag("help") {
        print!("{USAGE}");
        return Ok(());
    }
    match args.positional().first().map(String::as_str) {
        Some("probe") => {
            args.check_known(&["socket-path", "json", "help", "device"])?;
            let path = args
                .get("socket-path")
                .ok_or_else(|| format!("--socket-path is required\n{USAGE}"))?;
            let device = match args.get("device").unwrap_or("blk") {
                "blk" => Kind::Blk,
                "net" => Kind::Net,
                d => return Err(format!("unknown --device {d:?} (blk or net)")),
            };
            // The virtio-blk config space is 60 bytes; some back-ends expose
            // a shorter one (up to write_zeroes_may_unmap, 57 bytes). The
            // virtio-net one is 24 bytes, or 12 up to the mtu, 10 up to
            // max_virtqueue_pairs.
            let lens: &[u32] = match device {
                Kind::Blk => &[60, 57],
                Kind::Net => &[24, 12, 10],
            };
            let probe = FrontendLink::probe(path, lens).map_err(|e| format!("{path}: {e}"))?;
            if args.flag("json") {
                print!("{}", json(&probe, device));
            } else {
                print!("{}", text(&probe, device));
            }
            Ok(())
        }
        Some("bench") => {
            args.check_known(&[
                "socket-path",
                "rw",
                "bs",
                "iodepth",
                "queues",
                "runtime",
                "requests",
                "poll",
                "verify",
                "json",
                "help",
                "reconnect",
                "timeout",
                "packed",
                "inband",
                "no-guest-features",
                "in-order",
                "flush-every",
                "buffer-offset",
                "migrate-every",
                "to",
                "message-45",
            ])?;
            let path = args
                .get("socket-path")
                .ok_or_else(|| format!("--socket-path is required\n{USAGE}"))?;
            let requests: Option<u64> = args
                .get("requests")
                .map(str::parse)
                .transpose()
                .map_err(|_| "invalid --requests")?;
            let runtime: Option<f64> = args
                .get("runtime")
                .map(str::parse)
                .transpose()
                .map_err(|_| "invalid --runtime")?;
            let seconds = |name: &str, v: f64| {
                std::time::Duration::try_from_secs_f64(v)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| format!("invalid --{name} {v}"))
            };
            let timeout = seconds("timeout", args.get_or("timeout", 30.0)?)?;
            let o = vhu_examples::bench::Options {
                rw: args.get_or("rw", vhu_examples::bench::Rw::RandRead)?,
                bs: args.get_or("bs", 4096)?,
                iodepth: args.get_or("iodepth", 1)?,
                queues: args.get_or("queues", 1)?,
                runtime: match (runtime, requests) {
                    (Some(t), _) => Some(seconds("runtime", t)?),
                    (None, None) => Some(std::time::Duration::from_secs(5)),
                    (None, Some(_)) => None,
                },
                requests,
                poll: args.flag("poll"),
                verify: args.flag("verify"),
                progress: !args.flag("json"),
                reconnect: args.flag("reconnect"),
                timeout,
                packed: args.flag("packed"),
                inband: args.flag("inband"),
                guest_features: !args.flag("no-guest-features"),
                in_order: args.flag("in-order"),
                flush_every: match args.get_or("flush-every", 0u64)? {
                    0 => None,
                    n => Some(n),
                },
                buffer_offset: args.get_or("buffer-offset", 0)?,
                migrate: match (args.get("migrate-every"), args.get("to")) {
                    (None, None) => None,
                    (Some(every), Some(to)) => Some(vhu_examples::bench::Migrate {
                        every: seconds(
                            "migrate-every",
                            every.parse().map_err(|_| "invalid --migrate-every")?,
                        )?,
                        to: to.into(),
                        message_45: args.flag("message-45"),
                    }),
                    _ => return Err("--migrate-every and --to go together".into()),
                },
            };
            let r = vhu_examples::bench::run(Path::new(path), &o)?;
            if args.flag("json") {
                print!("{}", r.json());
            } else {
                print!("{}", r.text());
            }
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    }
}

/// The device a probe decodes the device bits and config space as.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blk,
    Net,
}

/// Names of the device-specific bits of virtio-net (0-23).
const NET_BITS: &[(u32, &str)] = &[
    (0, "net.CSUM"),
    (1, "net.GUEST_CSUM"),
    (2, "net.CTRL_GUEST_OFFLOADS"),
    (3, "net.MTU"),
    (5, "net.MAC"),
    (7, "net.GUEST_TSO4"),
    (8, "net.GUEST_TSO6"),
    (9, "net.GUEST_ECN"),
    (10, "net.GUEST_UFO"),
    (11, "net.HOST_TSO4"),
    (12, "net.HOST_TSO6"),
    (13, "net.HOST_ECN"),
    (14, "net.HOST_UFO"),
    (15, "net.MRG_RXBUF"),
    (16, "net.STATUS"),
    (17, "net.CTRL_VQ"),
    (18, "net.CTRL_RX"),
    (19, "net.CTRL_VLAN"),
    (21, "net.GUEST_ANNOUNCE"),
    (22, "net.MQ"),
    (23, "net.CTRL_MAC_ADDR"),
];

/// Names of the device-specific bits of virtio-blk (0-23).
const BLK_BITS: &[(u32, &str)] = &[
    (1, "blk.SIZE_MAX"),
    (2, "blk.SEG_MAX"),
    (4, "blk.GEOMETRY"),
    (5, "blk.RO"),
    (6, "blk.BLK_SIZE"),
    (9, "blk.FLUSH"),
    (10, "blk.TOPOLOGY"),
    (11, "blk.CONFIG_WCE"),
    (12, "blk.MQ"),
    (13, "blk.DISCARD"),
    (14, "blk.WRITE_ZEROES"),
    (15, "blk.LIFETIME"),
    (16, "blk.SECURE_ERASE"),
    (17, "blk.ZONED"),
];

/// The names of the set bits of `flags`; bits without a flag name are
/// named by `other` (or `bitN`).
fn names<F: bitflags::Flags<Bits = u64>>(
    flags: F,
    other: impl Fn(u32) -> Option<&'static str>,
) -> Vec<String> {
    let mut v: Vec<String> = flags.iter_names().map(|(n, _)| n.to_string()).collect();
    let named = flags.iter_names().fold(0u64, |a, (_, b)| a | b.bits());
    let rest = flags.bits() & !named;
    for bit in (0..64).filter(|b| rest & (1 << b) != 0) {
        v.push(other(bit).map_or_else(|| format!("bit{bit}"), str::to_string));
    }
    v
}

/// Feature names; device bits are named as the device's when its config
/// space was read (`decoded`).
fn virtio_names(f: VirtioFeatures, device: Kind, decoded: bool) -> Vec<String> {
    let table = match device {
        Kind::Blk => BLK_BITS,
        Kind::Net => NET_BITS,
    };
    names(f, |bit| {
        table
            .iter()
            .find(|(b, _)| decoded && *b == bit)
            .map(|(_, n)| *n)
    })
}

fn protocol_names(p: ProtocolFeatures) -> Vec<String> {
    names(p, |_| None)
}

fn le(c: &[u8], at: usize, n: usize) -> u64 {
    c.get(at..at + n)
        .map(|b| b.iter().rev().fold(0u64, |a, x| a << 8 | u64::from(*x)))
        .unwrap_or(0)
}

/// The virtio-blk config fields, if the config is at least 57 bytes.
fn blk_fields(c: &[u8]) -> Vec<(&'static str, u64)> {
    if c.len() < 57 {
        return Vec::new();
    }
    vec![
        ("capacity", le(c, 0, 8)),
        ("size_max", le(c, 8, 4)),
        ("seg_max", le(c, 12, 4)),
        ("blk_size", le(c, 20, 4)),
        ("physical_block_exp", le(c, 24, 1)),
        ("min_io_size", le(c, 26, 2)),
        ("opt_io_size", le(c, 28, 4)),
        ("writeback", le(c, 32, 1)),
        ("num_queues", le(c, 34, 2)),
        ("max_discard_sectors", le(c, 36, 4)),
        ("max_discard_seg", le(c, 40, 4)),
        ("discard_sector_alignment", le(c, 44, 4)),
        ("max_write_zeroes_sectors", le(c, 48, 4)),
        ("max_write_zeroes_seg", le(c, 52, 4)),
        ("write_zeroes_may_unmap", le(c, 56, 1)),
    ]
}

/// The virtio-net config fields there are room for (at least the mac and
/// the status, 8 bytes); the mac as its usual text.
fn net_fields(c: &[u8]) -> Vec<(&'static str, String)> {
    let mut v = Vec::new();
    let Some(mac) = c.get(..6) else {
        return v;
    };
    if c.len() < 8 {
        return v;
    }
    let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    v.push(("mac", format!("\"{}\"", mac.join(":"))));
    v.push(("status", le(c, 6, 2).to_string()));
    if c.len() >= 10 {
        v.push(("max_virtqueue_pairs", le(c, 8, 2).to_string()));
    }
    if c.len() >= 12 {
        v.push(("mtu", le(c, 10, 2).to_string()));
    }
    if c.len() >= 17 {
        v.push(("speed", le(c, 12, 4).to_string()));
        v.push(("duplex", le(c, 16, 1).to_string()));
    }
    v
}

/// The config space's fields for `device`, as text values.
fn fields(c: &[u8], device: Kind) -> Vec<(&'static str, String)> {
    match device {
        Kind::Blk => blk_fields(c)
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect(),
        Kind::Net => net_fields(c),
    }
}

fn prefix(device: Kind) -> &'static str {
    match device {
        Kind::Blk => "blk",
        Kind::Net => "net",
    }
}

fn hex(c: &[u8]) -> String {
    c.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(p: &Probe, device: Kind) -> String {
    let mut s = String::new();
    let i = &p.info;
    let f = fields(&p.config, device);
    let _ = writeln!(
        s,
        "virtio features:  {:#018x} {}",
        i.features.bits(),
        virtio_names(i.features, device, !f.is_empty()).join(" ")
    );
    match i.protocol_features {
        Some(pf) => {
            let _ = writeln!(
                s,
                "protocol features: {:#018x} {}",
                pf.bits(),
                protocol_names(pf).join(" ")
            );
        }
        None => {
            let _ = writeln!(
                s,
                "protocol features: none (VHOST_USER_F_PROTOCOL_FEATURES not offered)"
            );
        }
    }
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let _ = writeln!(s, "queues:            {}", opt(i.queue_num));
    let _ = writeln!(s, "max memory slots:  {}", opt(i.max_mem_slots));
    if !p.config.is_empty() {
        let _ = writeln!(s, "config ({} bytes): {}", p.config.len(), hex(&p.config));
        for (k, v) in &f {
            let _ = writeln!(s, "  {}.{k}: {}", prefix(device), v.trim_matches('"'));
        }
    }
    s
}

fn json_list(v: &[String]) -> String {
    let items: Vec<String> = v.iter().map(|n| format!("\"{n}\"")).collect();
    format!("[{}]", items.join(", "))
}

fn json(p: &Probe, device: Kind) -> String {
    let i = &p.info;
    let f = fields(&p.config, device);
    let opt = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
    let mut s = String::from("{\n");
    let _ = writeln!(s, "  \"virtio_features\": {},", i.features.bits());
    let _ = writeln!(
        s,
        "  \"virtio_feature_names\": {},",
        json_list(&virtio_names(i.features, device, !f.is_empty()))
    );
    let _ = writeln!(
        s,
        "  \"protocol_features\": {},",
        opt(i.protocol_features.map(|p| p.bits()))
    );
    let names = i.protocol_features.map(protocol_names).unwrap_or_default();
    let _ = writeln!(s, "  \"protocol_feature_names\": {},", json_list(&names));
    let _ = writeln!(s, "  \"queues\": {},", opt(i.queue_num));
    let _ = writeln!(s, "  \"max_mem_slots\": {},", opt(i.max_mem_slots));
    let _ = write!(s, "  \"config\": \"{}\"", hex(&p.config));
    if !f.is_empty() {
        let fields: Vec<String> = f.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
        let _ = write!(s, ",\n  \"{}\": {{{}}}", prefix(device), fields.join(", "));
    }
    s.push_str("\n}\n");
    s
}
