//! The version of the C ABI, for a program to check at run time that the
//! library it was linked or loaded with serves the header it was built
//! against: `vhu_abi_check(VHU_ABI_VERSION)` first thing, before any
//! other call. A shared library (`libvhost_user_c.so`) can be replaced
//! under a program, and a static one linked from another build; the
//! versioned structs (`struct_size`) catch a struct that grew, not a
//! function or value whose meaning changed.
//!
//! The version is `major << 16 | minor`. A library serves a program built
//! against a header of the same major version and of its minor version or
//! an older one: a minor version adds (functions, struct versions,
//! constants, result codes) and keeps every older one as it was; a major
//! version changes or removes something.

use crate::result::vhu_result::{self, *};

/// The ABI's major version: a change or removal a program built against
/// an older header would misread.
pub const VHU_ABI_MAJOR: u32 = 1;

/// The ABI's minor version: additions since the major version, each older
/// one kept. 1: live migration: the dirty log (`VHU_F_LOG_ALL`,
/// `VHU_PROTOCOL_F_LOG_SHMFD`; for a back-end `VHU_ACTION_MAP_LOG` to
/// `VHU_ACTION_SET_RING_LOG`, `vhu_log_mark()`, `vhu_log_mark_written()`,
/// `vhu_dataplane_log_used()`, `vhu_backend_ring_log()`; for a front-end
/// `vhu_frontend_start_logging()`, `vhu_frontend_stop_logging()`,
/// `VHU_FD_LOG`, `VHU_EVENT_LOGGING_ON` and `_OFF`,
/// `vhu_log_bitmap_size()`) and the device state (`VHU_PROTOCOL_F_DEVICE_STATE`;
/// for a back-end `VHU_ACTION_TRANSFER_STATE`,
/// `VHU_REPLY_TRANSFER_PENDING`, `vhu_backend_finish_transfer()`,
/// `vhu_backend_inflight_layout()`, `vhu_blk_state_size()`,
/// `vhu_blk_save_state()`, `vhu_blk_load_state()`; for a front-end
/// `vhu_frontend_transfer_state()`, `vhu_frontend_check_state()`,
/// `VHU_FD_DEVICE_STATE`, `VHU_EVENT_STATE_TRANSFER` (and
/// `_BACKEND_FD`), `VHU_EVENT_STATE_CHECKED`); a back-end's channel
/// (`vhu_channel`, `vhu_backend_channel()`, `vhu_channel_config_change()`,
/// `vhu_channel_vring_call()`, `vhu_channel_vring_err()`,
/// `vhu_channel_reply()`, `vhu_channel_abandon()`; INBAND_NOTIFICATIONS
/// offered, SET_CALL/SET_ERR's `flag` for in-band); a blk device resized
/// (`vhu_blk_set_capacity()`). 2: a refused device state transfer
/// (`VHU_ERR_NACK` to SET_DEVICE_STATE_FD or CHECK_DEVICE_STATE from
/// `vhu_frontend_handle_reply()`) leaves the front-end engine going
/// (1.1 failed it; a program that ends the connection on it is served
/// as before), and `vhu_log_mark_written()` refuses a chain whole (1.1
/// marked the segments before the one the log does not cover).
pub const VHU_ABI_MINOR: u32 = 2;

/// The version this header describes, `VHU_ABI_MAJOR << 16 |
/// VHU_ABI_MINOR`: the argument of `vhu_abi_check()`.
pub const VHU_ABI_VERSION: u32 = (VHU_ABI_MAJOR << 16) | VHU_ABI_MINOR;

/// The version of the ABI this library implements (`VHU_ABI_VERSION` of
/// the header it was built with), `major << 16 | minor`.
#[no_mangle]
pub extern "C" fn vhu_abi_version() -> u32 {
    VHU_ABI_VERSION
}

/// Whether this library serves a program built against the header of ABI
/// version `version` (pass `VHU_ABI_VERSION`): `VHU_OK` if the major
/// versions are the same and the library's minor version is at least
/// `version`'s, else `VHU_ERR_ABI` (the program must not call the library
/// further).
#[no_mangle]
pub extern "C" fn vhu_abi_check(version: u32) -> vhu_result {
    let (major, minor) = (version >> 16, version & 0xffff);
    // The library's minor version is the header's or newer.
    if major == VHU_ABI_MAJOR && VHU_ABI_MINOR.checked_sub(minor).is_some() {
        VHU_OK
    } else {
        VHU_ERR_ABI
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_of_the_same_major_and_no_newer_minor_is_served() {
        let v = |major: u32, minor: u32| (major << 16) | minor;
        assert_eq!(vhu_abi_version(), v(VHU_ABI_MAJOR, VHU_ABI_MINOR));
        assert_eq!(vhu_abi_check(VHU_ABI_VERSION), VHU_OK);
        if let Some(older) = VHU_ABI_MINOR.checked_sub(1) {
            assert_eq!(vhu_abi_check(v(VHU_ABI_MAJOR, older)), VHU_OK);
        }
        // A newer minor: functions or values this library lacks.
        assert_eq!(
            vhu_abi_check(v(VHU_ABI_MAJOR, VHU_ABI_MINOR + 1)),
            VHU_ERR_ABI
        );
        // Another major, older or newer; a minor that overflows into it.
        assert_eq!(vhu_abi_check(v(VHU_ABI_MAJOR + 1, 0)), VHU_ERR_ABI);
        assert_eq!(
            vhu_abi_check(v(VHU_ABI_MAJOR - 1, VHU_ABI_MINOR)),
            VHU_ERR_ABI
        );
        assert_eq!(vhu_abi_check(0), VHU_ERR_ABI);
        assert_eq!(vhu_abi_check(u32::MAX), VHU_ERR_ABI);
    }
}
