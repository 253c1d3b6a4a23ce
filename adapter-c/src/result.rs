//! The one result type of the C ABI, and the mapping of the core's typed
//! errors onto it by class.

use core::ffi::c_char;

use vhost_user_core::backend::BackendError;
use vhost_user_core::dataplane::DataPlaneError;
use vhost_user_core::frontend::FrontendError;
use vhost_user_core::message::WireError;
use vhost_user_core::vring::VringError;

/// The result of every call that can fail. `VHU_OK` is 0; every other
/// value is an error class (`vhu_result_str()` names it).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum vhu_result {
    /// Success.
    VHU_OK = 0,
    /// A required pointer is NULL.
    VHU_ERR_NULL = 1,
    /// A pointer is not aligned for what it points at (state storage:
    /// `vhu_*_align()`).
    VHU_ERR_ALIGN = 2,
    /// State storage is smaller than `vhu_*_size()` says it must be.
    VHU_ERR_SIZE = 3,
    /// An output buffer is too short, or a message is shorter than its
    /// header says.
    VHU_ERR_SHORT_BUFFER = 4,
    /// An argument is out of range (a queue index, a status value, a
    /// region whose end overflows, ...), or pointers of one call overlap:
    /// a buffer that shares a byte with a state the call uses, an output
    /// that shares one with another buffer of the call, a guest memory
    /// region whose host range covers either; or a call made from a
    /// callback uses bytes of the call the callback runs in that it was
    /// not handed.
    VHU_ERR_INVALID = 5,
    /// The storage does not hold the state the call expects (not
    /// initialised, or initialised as another kind of state).
    VHU_ERR_STATE = 6,
    /// A malformed message: the connection must end.
    VHU_ERR_WIRE = 7,
    /// Feature negotiation refused (bits never offered, a missing
    /// dependency, protocol features dropped).
    VHU_ERR_FEATURE = 8,
    /// A message whose feature was not negotiated.
    VHU_ERR_NOT_NEGOTIATED = 9,
    /// Guest memory refused an access, or a memory table change was
    /// refused.
    VHU_ERR_MEMORY = 10,
    /// A ring is misconfigured, or the guest broke a ring rule (the ring
    /// is broken from then on).
    VHU_ERR_RING = 11,
    /// No such queue, or a ring size above the maximum.
    VHU_ERR_QUEUE = 12,
    /// The inflight area was refused, is missing, or could not be written.
    VHU_ERR_INFLIGHT = 13,
    /// A config space access was refused.
    VHU_ERR_CONFIG = 14,
    /// Something the engine does not implement, or was not offered.
    VHU_ERR_UNSUPPORTED = 15,
    /// `complete` of a token that is not outstanding.
    VHU_ERR_NOT_OUTSTANDING = 16,
    /// The ring was stopped; its tokens are void.
    VHU_ERR_STOPPED = 17,
    /// Not now: a ring runs, another flow runs, the state does not allow
    /// the command, or a call is inside the state already (a callback
    /// called back into the library on the state of the call it runs in).
    VHU_ERR_BUSY = 18,
    /// The back-end refused a request (a failed REPLY_ACK).
    VHU_ERR_NACK = 19,
    /// The peer broke the protocol (a reply the front-end engine refuses);
    /// the connection must end.
    VHU_ERR_PROTOCOL = 20,
    /// The front-end engine failed earlier; the connection must end.
    VHU_ERR_FAILED = 21,
    /// The session refused the message for a reason without a class of
    /// its own, or a device callback refused it (`set_mtu` or `send_rarp`
    /// answered false).
    VHU_ERR_REFUSED = 22,
    /// A panic was caught at the boundary (a bug): initialise the state
    /// involved again.
    VHU_ERR_INTERNAL = 23,
    /// A struct's `struct_size` is not a size of it this library knows:
    /// a program built against another version of `vhu.h`, or a struct
    /// not initialised with its `VHU_*_INIT` (or `sizeof`). Nothing past
    /// the size was read, and nothing was written into the struct. Also
    /// `vhu_abi_check()` of a header version this library does not serve.
    VHU_ERR_ABI = 24,
    /// NET_SET_MTU with a value outside 68 to 65535: refused by the
    /// session before the device's `set_mtu` is called (a refusal of
    /// `set_mtu` itself, such as an MTU above the device's largest, is
    /// `VHU_ERR_REFUSED`).
    VHU_ERR_BAD_MTU = 25,
}

use vhu_result::*;

/// The name and meaning of a result, as a static NUL-terminated string
/// (never NULL; an unknown value gives "unknown result").
#[no_mangle]
pub extern "C" fn vhu_result_str(result: u32) -> *const c_char {
    let s: &'static core::ffi::CStr = match result {
        0 => c"VHU_OK: success",
        1 => c"VHU_ERR_NULL: a required pointer is NULL",
        2 => c"VHU_ERR_ALIGN: a pointer is misaligned",
        3 => c"VHU_ERR_SIZE: state storage is too small",
        4 => c"VHU_ERR_SHORT_BUFFER: a buffer is too short",
        5 => c"VHU_ERR_INVALID: an argument is out of range",
        6 => c"VHU_ERR_STATE: the storage does not hold the expected state",
        7 => c"VHU_ERR_WIRE: malformed message",
        8 => c"VHU_ERR_FEATURE: feature negotiation refused",
        9 => c"VHU_ERR_NOT_NEGOTIATED: the message's feature was not negotiated",
        10 => c"VHU_ERR_MEMORY: guest memory refused the access or the table change",
        11 => c"VHU_ERR_RING: ring misconfigured or broken",
        12 => c"VHU_ERR_QUEUE: no such queue or ring size too large",
        13 => c"VHU_ERR_INFLIGHT: inflight area refused or missing",
        14 => c"VHU_ERR_CONFIG: config space access refused",
        15 => c"VHU_ERR_UNSUPPORTED: not implemented or not offered",
        16 => c"VHU_ERR_NOT_OUTSTANDING: no such request outstanding",
        17 => c"VHU_ERR_STOPPED: the ring was stopped",
        18 => c"VHU_ERR_BUSY: not allowed now",
        19 => c"VHU_ERR_NACK: the back-end refused the request",
        20 => c"VHU_ERR_PROTOCOL: the peer broke the protocol",
        21 => c"VHU_ERR_FAILED: the front-end engine failed earlier",
        22 => c"VHU_ERR_REFUSED: the message was refused",
        23 => c"VHU_ERR_INTERNAL: internal error (a panic was caught)",
        24 => c"VHU_ERR_ABI: a struct's struct_size, or the header's ABI version, is not one this library knows",
        25 => c"VHU_ERR_BAD_MTU: NET_SET_MTU outside 68 to 65535",
        _ => c"unknown result",
    };
    s.as_ptr()
}

/// Runs the body of an exported call: its error, or `VHU_OK`; with `std`,
/// a panic is caught here and never crosses into C.
#[inline]
pub(crate) fn guard(f: impl FnOnce() -> Result<(), vhu_result>) -> vhu_result {
    #[cfg(feature = "std")]
    let r =
        std::panic::catch_unwind(core::panic::AssertUnwindSafe(f)).unwrap_or(Err(VHU_ERR_INTERNAL));
    #[cfg(not(feature = "std"))]
    let r = f();
    match r {
        Ok(()) => VHU_OK,
        Err(e) => e,
    }
}

// The core's error types are mapped by class: a variant added or a payload
// changed in the core lands in the class of its kind (the catch-alls).

pub(crate) fn wire(e: WireError) -> vhu_result {
    match e {
        WireError::BufferTooSmall { .. } => VHU_ERR_SHORT_BUFFER,
        _ => VHU_ERR_WIRE,
    }
}

pub(crate) fn vring(e: VringError) -> vhu_result {
    match e {
        VringError::Memory(_) => VHU_ERR_MEMORY,
        _ => VHU_ERR_RING,
    }
}

pub(crate) fn dataplane(e: DataPlaneError) -> vhu_result {
    #[allow(unreachable_patterns)]
    match e {
        DataPlaneError::Vring(v) => vring(v),
        DataPlaneError::Inflight(_) | DataPlaneError::NoInflightArea => VHU_ERR_INFLIGHT,
        DataPlaneError::NotOutstanding => VHU_ERR_NOT_OUTSTANDING,
        DataPlaneError::Stopped => VHU_ERR_STOPPED,
        _ => VHU_ERR_RING,
    }
}

pub(crate) fn backend(e: BackendError) -> vhu_result {
    #[allow(unreachable_patterns)]
    match e {
        BackendError::Wire(w) => wire(w),
        BackendError::Feature(_) | BackendError::ProtocolFeaturesDropped => VHU_ERR_FEATURE,
        BackendError::NotNegotiated(_) => VHU_ERR_NOT_NEGOTIATED,
        BackendError::Memory(_) => VHU_ERR_MEMORY,
        BackendError::Vring(v) => vring(v),
        BackendError::NoSuchQueue(_) | BackendError::QueueSize(_) => VHU_ERR_QUEUE,
        BackendError::RingRunning(_) | BackendError::FeaturesWhileRunning => VHU_ERR_BUSY,
        BackendError::RingNotConfigured(_) | BackendError::RingAddress(_) => VHU_ERR_RING,
        BackendError::LoggingNotSupported | BackendError::Unsupported => VHU_ERR_UNSUPPORTED,
        BackendError::Config => VHU_ERR_CONFIG,
        BackendError::NotStopping(_) => VHU_ERR_STATE,
        BackendError::Inflight(_) => VHU_ERR_INFLIGHT,
        BackendError::BadMtu(_) => VHU_ERR_BAD_MTU,
        // A device callback answered false (`set_mtu`, `send_rarp`).
        BackendError::DeviceRefused(_) => VHU_ERR_REFUSED,
        _ => VHU_ERR_REFUSED,
    }
}

pub(crate) fn frontend(e: FrontendError) -> vhu_result {
    match e {
        FrontendError::Wire(w) => wire(w),
        FrontendError::Nack { .. } | FrontendError::StateRefused { .. } => VHU_ERR_NACK,
        FrontendError::Busy | FrontendError::WrongState(_) => VHU_ERR_BUSY,
        FrontendError::NotNegotiated(_) => VHU_ERR_NOT_NEGOTIATED,
        FrontendError::Unsupported(_) | FrontendError::LogAllNotOffered => VHU_ERR_UNSUPPORTED,
        FrontendError::AlreadyLogging | FrontendError::NotLogging => VHU_ERR_BUSY,
        FrontendError::TooManyRegions { .. }
        | FrontendError::NoRegions
        | FrontendError::NoQueues
        | FrontendError::BadQueue(_)
        | FrontendError::BadRegion(_)
        | FrontendError::BadConfigRange { .. }
        | FrontendError::LogTooSmall { .. } => VHU_ERR_INVALID,
        FrontendError::Failed => VHU_ERR_FAILED,
        _ => VHU_ERR_PROTOCOL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last result value (`vhu_result_str()` names each up to it).
    const LAST: vhu_result = VHU_ERR_BAD_MTU;

    #[test]
    fn every_result_has_its_own_name() {
        for v in 0..=LAST as u32 {
            // SAFETY: vhu_result_str returns a static NUL-terminated string.
            let s = unsafe { core::ffi::CStr::from_ptr(vhu_result_str(v)) };
            let s = s.to_str().unwrap_or("");
            assert!(s.starts_with("VHU_"), "{v}: {s}");
        }
        // SAFETY: as above.
        let s = unsafe { core::ffi::CStr::from_ptr(vhu_result_str(999)) };
        assert_eq!(s.to_bytes(), b"unknown result");
    }

    #[cfg(feature = "std")]
    #[test]
    fn a_panic_is_an_error_code() {
        assert_eq!(guard(|| Ok(())), VHU_OK);
        assert_eq!(guard(|| Err(VHU_ERR_RING)), VHU_ERR_RING);
        let hook = std::panic::take_hook();
        std::panic::set_hook(std::boxed::Box::new(|_| {}));
        let r = guard(|| panic!("boom"));
        std::panic::set_hook(hook);
        assert_eq!(r, VHU_ERR_INTERNAL);
    }
}
