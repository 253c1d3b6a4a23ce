//! Raw wire structs: one per payload layout of the specification, all fields
//! alignment 1 and in the machine's native byte order, so any byte slice of the
//! right length is a valid value (`zerocopy::FromBytes`). Each size is pinned by
//! a `const` assertion.

// zerocopy's derives generate hidden helper types without Debug.
#![allow(missing_debug_implementations)]

use zerocopy::byteorder::native_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

macro_rules! wire_struct {
    ($(#[$m:meta])* $name:ident, $size:expr, { $($(#[$fm:meta])* pub $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, PartialEq, Eq, Debug)]
        #[repr(C)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        const _: () = assert!(core::mem::size_of::<$name>() == $size);
        impl $name {
            /// Size of this payload on the wire.
            pub const SIZE: usize = $size;
        }
    };
}

wire_struct!(
    /// The 12-byte header in front of every message on both channels.
    Header, 12, {
        /// Request id.
        pub request: U32,
        /// Version (bits 0-1), REPLY (bit 2), NEED_REPLY (bit 3).
        pub flags: U32,
        /// Payload size in bytes.
        pub size: U32,
    }
);

wire_struct!(
    /// A single u64 (features, acks, status, kick/call/err fd index).
    Word, 8, {
        /// The value.
        pub value: U64,
    }
);

wire_struct!(
    /// `struct vhost_vring_state`.
    VringState, 8, {
        /// Ring index.
        pub index: U32,
        /// Value (ring size, base, enable flag, endianness).
        pub num: U32,
    }
);

wire_struct!(
    /// `struct vhost_vring_addr`; on the wire the order is desc, used, avail, log.
    VringAddr, 40, {
        /// Ring index.
        pub index: U32,
        /// Bit 0: log used-ring writes.
        pub flags: U32,
        /// Descriptor table address.
        pub desc: U64,
        /// Used ring address.
        pub used: U64,
        /// Available ring address.
        pub avail: U64,
        /// Guest address for used-ring logging.
        pub log: U64,
    }
);

wire_struct!(
    /// One memory region.
    MemRegion, 32, {
        /// Guest physical address.
        pub guest_addr: U64,
        /// Size in bytes.
        pub size: U64,
        /// Front-end virtual address (or GPA with GPA_ADDRESSES).
        pub user_addr: U64,
        /// Offset into the fd where the region starts.
        pub mmap_offset: U64,
    }
);

wire_struct!(
    /// One memory region with the XEN_MMAP extension.
    XenMemRegion, 40, {
        /// The common fields.
        pub region: MemRegion,
        /// Xen mmap flags.
        pub xen_flags: U32,
        /// Xen domain id.
        pub domid: U32,
    }
);

wire_struct!(
    /// The head of SET_MEM_TABLE; `nregions` regions follow.
    MemTableHead, 8, {
        /// Number of regions that follow.
        pub nregions: U32,
        /// Padding.
        pub padding: U32,
    }
);

wire_struct!(
    /// ADD_MEM_REG / REM_MEM_REG payload.
    SingleMemRegion, 40, {
        /// Padding.
        pub padding: U64,
        /// The region.
        pub region: MemRegion,
    }
);

wire_struct!(
    /// ADD_MEM_REG / REM_MEM_REG payload with the XEN_MMAP extension.
    XenSingleMemRegion, 48, {
        /// Padding.
        pub padding: U64,
        /// The region.
        pub region: XenMemRegion,
    }
);

wire_struct!(
    /// SET_LOG_BASE payload.
    Log, 16, {
        /// Size of the log area.
        pub mmap_size: U64,
        /// Offset of the log area in the fd.
        pub mmap_offset: U64,
    }
);

wire_struct!(
    /// `struct vhost_iotlb_msg`.
    Iotlb, 32, {
        /// I/O virtual address.
        pub iova: U64,
        /// Size of the range.
        pub size: U64,
        /// Front-end virtual address.
        pub uaddr: U64,
        /// Access permission (0 none, 1 RO, 2 WO, 3 RW).
        pub perm: u8,
        /// Message type (1 miss, 2 update, 3 invalidate, 4 access fail).
        pub kind: u8,
        /// Padding.
        pub padding: [u8; 6],
    }
);

wire_struct!(
    /// The head of a device config payload; `size` bytes of config follow.
    ConfigHead, 12, {
        /// Offset into the config space.
        pub offset: U32,
        /// Number of config bytes.
        pub size: U32,
        /// 0: front-end write; 1: live-migration write.
        pub flags: U32,
    }
);

wire_struct!(
    /// BACKEND_VRING_HOST_NOTIFIER_MSG payload.
    VringArea, 24, {
        /// Bits 0-7 ring index, bit 8 no fd.
        pub index_flags: U64,
        /// Size of the area.
        pub size: U64,
        /// Offset of the area in the fd.
        pub offset: U64,
    }
);

wire_struct!(
    /// Inflight description (GET/SET_INFLIGHT_FD).
    Inflight, 24, {
        /// Size of the shared area.
        pub mmap_size: U64,
        /// Offset of the area in the fd.
        pub mmap_offset: U64,
        /// Number of queues.
        pub num_queues: U16,
        /// Size of each queue.
        pub queue_size: U16,
        /// Padding.
        pub padding: [u8; 4],
    }
);

wire_struct!(
    /// A shared-object UUID (RFC 4122 byte order).
    SharedObject, 16, {
        /// UUID bytes.
        pub uuid: [u8; 16],
    }
);

wire_struct!(
    /// SET_DEVICE_STATE_FD payload.
    DeviceStateTransfer, 8, {
        /// 0: save, 1: load.
        pub direction: U32,
        /// 0: stopped.
        pub phase: U32,
    }
);

wire_struct!(
    /// BACKEND_SHMEM_MAP / BACKEND_SHMEM_UNMAP payload.
    ShmemMap, 40, {
        /// Shared memory region id.
        pub shmid: u8,
        /// Padding.
        pub padding: [u8; 7],
        /// Offset into the fd.
        pub fd_offset: U64,
        /// Offset into the shared memory region.
        pub shm_offset: U64,
        /// Length of the mapping.
        pub len: U64,
        /// Bit 0: writable.
        pub flags: U64,
    }
);

wire_struct!(
    /// GET_SHMEM_CONFIG reply.
    ShmemConfig, 2056, {
        /// Number of regions in use.
        pub nregions: U32,
        /// Padding.
        pub padding: U32,
        /// Size of each region, indexed by shmid; 0 = unused.
        pub memory_sizes: [U64; 256],
    }
);
