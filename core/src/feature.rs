//! Virtio and protocol feature bits and their negotiation.
//!
//! The rule everywhere: what is acked is what was asked for **and** offered.
//! A peer that asks for a bit that was never offered is refused, not
//! trusted, and a protocol feature set that breaks a dependency rule (for
//! example GET_VRING_BASE_INFLIGHT without INFLIGHT_SHMFD) is refused too.

use core::fmt;

use bitflags::bitflags;

bitflags! {
    /// Virtio and vhost feature bits (GET/SET_FEATURES). Device-specific bits
    /// 0-23 pass through unnamed.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct VirtioFeatures: u64 {
        /// VIRTIO_F_NOTIFY_ON_EMPTY (legacy).
        const NOTIFY_ON_EMPTY = 1 << 24;
        /// VHOST_F_LOG_ALL: log every guest-memory write (migration).
        const LOG_ALL = 1 << 26;
        /// VIRTIO_F_ANY_LAYOUT (legacy).
        const ANY_LAYOUT = 1 << 27;
        /// VIRTIO_RING_F_INDIRECT_DESC.
        const INDIRECT_DESC = 1 << 28;
        /// VIRTIO_RING_F_EVENT_IDX.
        const EVENT_IDX = 1 << 29;
        /// VHOST_USER_F_PROTOCOL_FEATURES.
        const PROTOCOL_FEATURES = 1 << 30;
        /// VIRTIO_F_VERSION_1.
        const VERSION_1 = 1 << 32;
        /// VIRTIO_F_ACCESS_PLATFORM.
        const ACCESS_PLATFORM = 1 << 33;
        /// VIRTIO_F_RING_PACKED.
        const RING_PACKED = 1 << 34;
        /// VIRTIO_F_IN_ORDER.
        const IN_ORDER = 1 << 35;
        /// VIRTIO_F_ORDER_PLATFORM.
        const ORDER_PLATFORM = 1 << 36;
        /// VIRTIO_F_SR_IOV.
        const SR_IOV = 1 << 37;
        /// VIRTIO_F_NOTIFICATION_DATA.
        const NOTIFICATION_DATA = 1 << 38;
        /// VIRTIO_F_NOTIF_CONFIG_DATA.
        const NOTIF_CONFIG_DATA = 1 << 39;
        /// VIRTIO_F_RING_RESET.
        const RING_RESET = 1 << 40;
        /// VIRTIO_F_ADMIN_VQ.
        const ADMIN_VQ = 1 << 41;
        // Device-specific bits and future bits are kept as they are.
        const _ = !0;
    }
}

bitflags! {
    /// Protocol feature bits (GET/SET_PROTOCOL_FEATURES), 0-23.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct ProtocolFeatures: u64 {
        /// GET_QUEUE_NUM.
        const MQ = 1 << 0;
        /// Shared-memory dirty log.
        const LOG_SHMFD = 1 << 1;
        /// SEND_RARP.
        const RARP = 1 << 2;
        /// NEED_REPLY honoured on every request.
        const REPLY_ACK = 1 << 3;
        /// NET_SET_MTU.
        const MTU = 1 << 4;
        /// The back-end channel.
        const BACKEND_REQ = 1 << 5;
        /// SET_VRING_ENDIAN.
        const CROSS_ENDIAN = 1 << 6;
        /// Crypto sessions.
        const CRYPTO_SESSION = 1 << 7;
        /// Postcopy migration.
        const PAGEFAULT = 1 << 8;
        /// GET/SET_CONFIG.
        const CONFIG = 1 << 9;
        /// Fds on the back-end channel.
        const BACKEND_SEND_FD = 1 << 10;
        /// Host notifiers.
        const HOST_NOTIFIER = 1 << 11;
        /// Inflight I/O tracking.
        const INFLIGHT_SHMFD = 1 << 12;
        /// RESET_DEVICE.
        const RESET_DEVICE = 1 << 13;
        /// In-band notifications.
        const INBAND_NOTIFICATIONS = 1 << 14;
        /// GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG.
        const CONFIGURE_MEM_SLOTS = 1 << 15;
        /// SET/GET_STATUS.
        const STATUS = 1 << 16;
        /// Xen memory regions.
        const XEN_MMAP = 1 << 17;
        /// Shared objects.
        const SHARED_OBJECT = 1 << 18;
        /// Device state transfer.
        const DEVICE_STATE = 1 << 19;
        /// GET_VRING_BASE may suspend and record in-flight requests.
        const GET_VRING_BASE_INFLIGHT = 1 << 20;
        /// Guest physical addresses instead of front-end virtual addresses.
        const GPA_ADDRESSES = 1 << 21;
        /// VIRTIO shared memory regions.
        const SHMEM = 1 << 22;
        /// GET_VRING_BASE_SKIP_DRAIN.
        const GET_VRING_BASE_SKIP_DRAIN = 1 << 23;
    }
}

/// A protocol feature and the features it needs alongside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dependency {
    /// The feature.
    pub feature: ProtocolFeatures,
    /// What must be negotiated with it.
    pub requires: ProtocolFeatures,
}

/// The dependency rules between protocol features.
pub const PROTOCOL_DEPENDENCIES: &[Dependency] = &[
    Dependency {
        feature: ProtocolFeatures::BACKEND_SEND_FD,
        requires: ProtocolFeatures::BACKEND_REQ,
    },
    Dependency {
        feature: ProtocolFeatures::HOST_NOTIFIER,
        requires: ProtocolFeatures::BACKEND_REQ.union(ProtocolFeatures::BACKEND_SEND_FD),
    },
    Dependency {
        feature: ProtocolFeatures::INBAND_NOTIFICATIONS,
        requires: ProtocolFeatures::BACKEND_REQ.union(ProtocolFeatures::REPLY_ACK),
    },
    Dependency {
        feature: ProtocolFeatures::SHARED_OBJECT,
        requires: ProtocolFeatures::BACKEND_REQ,
    },
    Dependency {
        feature: ProtocolFeatures::SHMEM,
        requires: ProtocolFeatures::BACKEND_REQ.union(ProtocolFeatures::BACKEND_SEND_FD),
    },
    Dependency {
        feature: ProtocolFeatures::GET_VRING_BASE_INFLIGHT,
        requires: ProtocolFeatures::INFLIGHT_SHMFD,
    },
    Dependency {
        feature: ProtocolFeatures::GET_VRING_BASE_SKIP_DRAIN,
        requires: ProtocolFeatures::GET_VRING_BASE_INFLIGHT,
    },
];

impl ProtocolFeatures {
    /// Checks the dependency rules; returns the first broken one.
    pub fn check_dependencies(self) -> Result<(), FeatureError> {
        for d in PROTOCOL_DEPENDENCIES {
            if self.contains(d.feature) && !self.contains(d.requires) {
                return Err(FeatureError::MissingDependency {
                    feature: bit_number(d.feature.bits()),
                    requires: bit_number(d.requires.bits()),
                });
            }
        }
        Ok(())
    }

    /// Drops every feature whose dependencies are not in the set, until the
    /// set is consistent (what a front-end does before acking).
    pub fn without_unmet_dependencies(self) -> Self {
        let mut set = self;
        loop {
            let before = set;
            for d in PROTOCOL_DEPENDENCIES {
                if set.contains(d.feature) && !set.contains(d.requires) {
                    set.remove(d.feature);
                }
            }
            if set == before {
                return set;
            }
        }
    }

    /// The names of the set's known bits, for logs and tools.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        self.iter_names().map(|(name, _)| name)
    }
}

/// The number of the lowest bit set in `bits` (64 for none).
const fn bit_number(bits: u64) -> u8 {
    bits.trailing_zeros() as u8
}

/// [`FeatureError::NotOffered`] for the bits `extra`, which are logged.
fn not_offered(extra: u64) -> FeatureError {
    debug!("feature bits {:#x} requested but never offered", extra);
    FeatureError::NotOffered(bit_number(extra))
}

/// A negotiation that was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FeatureError {
    /// The peer asked for bits that were never offered (the number of the
    /// lowest such bit; all of them are logged).
    NotOffered(u8),
    /// A feature came without what it requires.
    MissingDependency {
        /// The number of the feature's bit.
        feature: u8,
        /// The number of the bit it requires.
        requires: u8,
    },
    /// Protocol features were used although VHOST_USER_F_PROTOCOL_FEATURES
    /// was not offered.
    ProtocolFeaturesNotOffered,
}

const _: () = assert!(core::mem::size_of::<FeatureError>() <= 4);

impl FeatureError {
    /// The value a REPLY_ACK carries for this error (non-zero = failure).
    pub fn ack_value(&self) -> u64 {
        1
    }
}

impl fmt::Display for FeatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FeatureError::NotOffered(bit) => {
                write!(f, "feature bit {bit} requested but never offered")
            }
            FeatureError::MissingDependency { feature, requires } => write!(
                f,
                "protocol feature bit {feature} requires bit {requires}, not negotiated"
            ),
            FeatureError::ProtocolFeaturesNotOffered => {
                write!(
                    f,
                    "protocol features used without VHOST_USER_F_PROTOCOL_FEATURES"
                )
            }
        }
    }
}

impl core::error::Error for FeatureError {}

/// Back-end side of SET_FEATURES: the acked set is `requested`, which must be
/// a subset of `offered`.
pub fn accept_virtio(
    offered: VirtioFeatures,
    requested: u64,
) -> Result<VirtioFeatures, FeatureError> {
    let extra = requested & !offered.bits();
    if extra != 0 {
        return Err(not_offered(extra));
    }
    Ok(VirtioFeatures::from_bits_retain(requested))
}

/// Back-end side of SET_PROTOCOL_FEATURES: `requested` must be a subset of
/// `offered` and satisfy every dependency rule.
pub fn accept_protocol(
    offered: ProtocolFeatures,
    requested: u64,
) -> Result<ProtocolFeatures, FeatureError> {
    let extra = requested & !offered.bits();
    if extra != 0 {
        return Err(not_offered(extra));
    }
    let acked = ProtocolFeatures::from_bits_retain(requested);
    acked.check_dependencies()?;
    Ok(acked)
}

/// Front-end side: what to ack of the virtio features a back-end offered,
/// given what the front-end wants.
pub fn select_virtio(offered: u64, wanted: VirtioFeatures) -> VirtioFeatures {
    VirtioFeatures::from_bits_retain(offered & wanted.bits())
}

/// Front-end side: what to ack of the protocol features a back-end offered,
/// given what the front-end supports; bits whose dependencies are not met
/// are dropped.
pub fn select_protocol(offered: u64, supported: ProtocolFeatures) -> ProtocolFeatures {
    ProtocolFeatures::from_bits_truncate(offered & supported.bits()).without_unmet_dependencies()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_is_requested_subset_of_offered() {
        let offered = VirtioFeatures::VERSION_1 | VirtioFeatures::EVENT_IDX;
        let acked = accept_virtio(offered, VirtioFeatures::VERSION_1.bits()).unwrap();
        assert_eq!(acked, VirtioFeatures::VERSION_1);
        assert_eq!(
            accept_virtio(
                offered,
                (VirtioFeatures::VERSION_1 | VirtioFeatures::RING_PACKED).bits()
            ),
            Err(FeatureError::NotOffered(34))
        );
    }

    #[test]
    fn device_bits_pass_through() {
        let offered = VirtioFeatures::from_bits_retain(1 << 6 | 1 << 32);
        assert_eq!(accept_virtio(offered, 1 << 6).unwrap().bits(), 1 << 6);
        assert_eq!(
            accept_virtio(offered, 1 << 7),
            Err(FeatureError::NotOffered(7))
        );
    }

    #[test]
    fn protocol_bits_never_offered_are_refused() {
        let offered = ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK;
        assert_eq!(
            accept_protocol(
                offered,
                (ProtocolFeatures::MQ | ProtocolFeatures::INFLIGHT_SHMFD).bits()
            ),
            Err(FeatureError::NotOffered(bit_number(
                ProtocolFeatures::INFLIGHT_SHMFD.bits()
            )))
        );
        // Unknown bits above 23 too.
        assert_eq!(
            accept_protocol(offered, 1 << 40),
            Err(FeatureError::NotOffered(40))
        );
        assert_eq!(accept_protocol(offered, 0), Ok(ProtocolFeatures::empty()));
    }

    #[test]
    fn every_dependency_rule_is_enforced() {
        let all = ProtocolFeatures::all();
        for d in PROTOCOL_DEPENDENCIES {
            // The feature with everything it needs is accepted...
            let ok = d.feature | d.requires;
            let closed = ok.without_unmet_dependencies();
            assert!(accept_protocol(all, closed.bits()).is_ok(), "{d:?}");
            // ...and refused without each required bit.
            for (_, bit) in d.requires.iter_names() {
                let broken = ok.difference(bit);
                let err = accept_protocol(all, broken.bits()).unwrap_err();
                assert!(
                    matches!(err, FeatureError::MissingDependency { .. }),
                    "{d:?} {err:?}"
                );
            }
        }
    }

    #[test]
    fn seed_two_inflight_rules() {
        let all = ProtocolFeatures::all();
        let inflight = ProtocolFeatures::GET_VRING_BASE_INFLIGHT;
        assert_eq!(
            accept_protocol(all, inflight.bits()),
            Err(FeatureError::MissingDependency {
                feature: 20,
                requires: 12
            })
        );
        assert!(accept_protocol(all, (inflight | ProtocolFeatures::INFLIGHT_SHMFD).bits()).is_ok());
        let skip = ProtocolFeatures::GET_VRING_BASE_SKIP_DRAIN | ProtocolFeatures::INFLIGHT_SHMFD;
        assert!(accept_protocol(all, skip.bits()).is_err());
    }

    #[test]
    fn frontend_masks_offer_and_dependencies() {
        // A back-end offering SKIP_DRAIN and bit 20 but not INFLIGHT_SHMFD:
        // the front-end must drop both (the chain collapses).
        let offered = (ProtocolFeatures::GET_VRING_BASE_SKIP_DRAIN
            | ProtocolFeatures::GET_VRING_BASE_INFLIGHT
            | ProtocolFeatures::MQ)
            .bits()
            | 1 << 50;
        let acked = select_protocol(offered, ProtocolFeatures::all());
        assert_eq!(acked, ProtocolFeatures::MQ);
        // INBAND without REPLY_ACK is dropped, with it kept.
        let offered =
            (ProtocolFeatures::INBAND_NOTIFICATIONS | ProtocolFeatures::BACKEND_REQ).bits();
        assert_eq!(
            select_protocol(offered, ProtocolFeatures::all()),
            ProtocolFeatures::BACKEND_REQ
        );
        let offered = offered | ProtocolFeatures::REPLY_ACK.bits();
        assert_eq!(
            select_protocol(offered, ProtocolFeatures::all()).bits(),
            offered
        );
        // What the front-end does not support is never acked.
        assert_eq!(
            select_virtio(u64::MAX, VirtioFeatures::VERSION_1),
            VirtioFeatures::VERSION_1
        );
    }
}
