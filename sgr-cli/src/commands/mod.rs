//! The subcommands of `sgr`, one file each (as cargo lays them out).

pub mod bench;
pub mod download;
pub mod eval;
pub mod inspect;
pub mod plot;
pub mod train;
