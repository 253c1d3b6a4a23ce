//! The per-ring state machine of the amended vhost-user specification.
//!
//! Two independent dimensions, started/stopped and enabled/disabled; the
//! initial state is stopped and disabled.
//!
//! | event | started | enabled |
//! |---|---|---|
//! | SET_VRING_KICK (fd or polling) | → started | kept |
//! | in-band VRING_KICK | → started | kept |
//! | GET_VRING_BASE | → stopped | kept |
//! | SET_VRING_ENABLE(1 / 0) | kept | → enabled / disabled |
//! | SET_FEATURES without bit 30 | kept | → enabled |
//! | SET_FEATURES with bit 30 | kept | kept |
//! | RESET_DEVICE | → stopped | → disabled (the initial state) |
//! | RESET_OWNER (deprecated) | kept | → disabled |
//!
//! A ring starts on SET_VRING_KICK without waiting for a kick, and a
//! stopped ring can be started again: the device then resumes the
//! requests already in the ring (the queue value keeps its indices).
//! Whether SET_VRING_ENABLE is legal (bit 30 negotiated) is the session's
//! business; the state machine only records the flag.

/// What the device may do with a ring in a given state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Processing {
    /// Stopped: do not touch the ring at all.
    Stopped,
    /// Started and disabled: process the ring without side effects (for
    /// example, complete requests with length 0, drop TX, supply no RX).
    WithoutSideEffects,
    /// Started and enabled: normal processing.
    Normal,
}

/// An event that changes a ring's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RingEvent {
    /// SET_VRING_KICK, with an fd or in polling mode.
    SetVringKick,
    /// In-band VRING_KICK (INBAND_NOTIFICATIONS).
    VringKick,
    /// GET_VRING_BASE.
    GetVringBase,
    /// SET_VRING_ENABLE with num 1 (`true`) or 0 (`false`).
    SetVringEnable(bool),
    /// SET_FEATURES; `protocol_features` is whether bit 30
    /// (VHOST_USER_F_PROTOCOL_FEATURES) is set.
    SetFeatures {
        /// Bit 30 is set in the acked features.
        protocol_features: bool,
    },
    /// RESET_DEVICE.
    ResetDevice,
    /// RESET_OWNER (deprecated).
    ResetOwner,
}

/// A ring's state: started/stopped and enabled/disabled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RingState {
    started: bool,
    enabled: bool,
}

impl RingState {
    /// The initial state: stopped and disabled.
    pub const INITIAL: RingState = RingState {
        started: false,
        enabled: false,
    };

    /// A state from its two flags.
    pub const fn new(started: bool, enabled: bool) -> Self {
        RingState { started, enabled }
    }

    /// Started (SET_VRING_KICK seen since the last GET_VRING_BASE).
    pub const fn is_started(self) -> bool {
        self.started
    }

    /// Enabled.
    pub const fn is_enabled(self) -> bool {
        self.enabled
    }

    /// What the device may do with the ring.
    pub const fn processing(self) -> Processing {
        match (self.started, self.enabled) {
            (false, _) => Processing::Stopped,
            (true, false) => Processing::WithoutSideEffects,
            (true, true) => Processing::Normal,
        }
    }

    /// The state after `event`.
    #[must_use]
    pub const fn apply(self, event: RingEvent) -> RingState {
        let RingState { started, enabled } = self;
        match event {
            RingEvent::SetVringKick | RingEvent::VringKick => RingState {
                started: true,
                enabled,
            },
            RingEvent::GetVringBase => RingState {
                started: false,
                enabled,
            },
            RingEvent::SetVringEnable(on) => RingState {
                started,
                enabled: on,
            },
            RingEvent::SetFeatures {
                protocol_features: false,
            } => RingState {
                started,
                enabled: true,
            },
            RingEvent::SetFeatures {
                protocol_features: true,
            } => self,
            RingEvent::ResetDevice => RingState::INITIAL,
            RingEvent::ResetOwner => RingState {
                started,
                enabled: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD: RingState = RingState::new(false, false);
    const SE: RingState = RingState::new(false, true);
    const RD: RingState = RingState::new(true, false);
    const RE: RingState = RingState::new(true, true);

    /// Every (state, event) pair, with the expected next state.
    #[test]
    fn transition_table() {
        use RingEvent::*;
        let pf = |b| SetFeatures {
            protocol_features: b,
        };
        #[rustfmt::skip]
        let table: [(RingEvent, [RingState; 4]); 9] = [
            // event                 from: SD  SE  RD  RE
            (SetVringKick,          [RD, RE, RD, RE]),
            (VringKick,             [RD, RE, RD, RE]),
            (GetVringBase,          [SD, SE, SD, SE]),
            (SetVringEnable(true),  [SE, SE, RE, RE]),
            (SetVringEnable(false), [SD, SD, RD, RD]),
            (pf(false),             [SE, SE, RE, RE]),
            (pf(true),              [SD, SE, RD, RE]),
            (ResetDevice,           [SD, SD, SD, SD]),
            (ResetOwner,            [SD, SD, RD, RD]),
        ];
        for (event, expected) in table {
            for (from, to) in [SD, SE, RD, RE].into_iter().zip(expected) {
                assert_eq!(from.apply(event), to, "{from:?} + {event:?}");
            }
        }
    }

    #[test]
    fn initial_state_and_processing() {
        assert_eq!(RingState::INITIAL, SD);
        assert_eq!(RingState::default(), SD);
        assert_eq!(SD.processing(), Processing::Stopped);
        assert_eq!(SE.processing(), Processing::Stopped);
        assert_eq!(RD.processing(), Processing::WithoutSideEffects);
        assert_eq!(RE.processing(), Processing::Normal);
    }

    /// The usual QEMU sequence with bit 30, a stop and a restart.
    #[test]
    fn start_stop_restart_sequence() {
        let s = RingState::INITIAL
            .apply(RingEvent::SetFeatures {
                protocol_features: true,
            })
            .apply(RingEvent::SetVringKick);
        // Started without any kick arriving, but disabled.
        assert_eq!(s.processing(), Processing::WithoutSideEffects);
        let s = s.apply(RingEvent::SetVringEnable(true));
        assert_eq!(s.processing(), Processing::Normal);
        let s = s
            .apply(RingEvent::SetVringEnable(false))
            .apply(RingEvent::GetVringBase);
        assert_eq!(s.processing(), Processing::Stopped);
        // Enable while stopped is remembered for the next start.
        let s = s
            .apply(RingEvent::SetVringEnable(true))
            .apply(RingEvent::SetVringKick);
        assert_eq!(s.processing(), Processing::Normal);
    }
}
