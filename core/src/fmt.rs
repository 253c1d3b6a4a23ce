//! Logging shim: forwards to `defmt` or `log` by feature and compiles to
//! nothing otherwise (the arguments are still type-checked, never evaluated
//! for side effects twice).
#![allow(unused_macros)]

macro_rules! vlog {
    ($level:ident, $($arg:tt)*) => {{
        #[cfg(feature = "defmt")]
        ::defmt::$level!($($arg)*);
        #[cfg(all(feature = "log", not(feature = "defmt")))]
        ::log::$level!($($arg)*);
        #[cfg(not(any(feature = "defmt", feature = "log")))]
        {
            if false {
                let _ = ::core::format_args!($($arg)*);
            }
        }
    }};
}

macro_rules! trace { ($($arg:tt)*) => { vlog!(trace, $($arg)*) }; }
macro_rules! debug { ($($arg:tt)*) => { vlog!(debug, $($arg)*) }; }
macro_rules! info { ($($arg:tt)*) => { vlog!(info, $($arg)*) }; }
macro_rules! warn { ($($arg:tt)*) => { vlog!(warn, $($arg)*) }; }
macro_rules! error { ($($arg:tt)*) => { vlog!(error, $($arg)*) }; }
