//! # sgr-data
//!
//! Data for sgr: the embedded 8×8 handwritten digits (the default data set, shipped inside the
//! crate), a CIFAR-10/100 binary reader that accepts any number of records per file, and a
//! shuffled, deterministic batcher producing candle tensors.
//!
//! candle-datasets is not used: its CIFAR reader hard-codes 10 000 records per file, its Hub
//! loader swaps height and width, and it pulls in a large dependency tree (candle-notes.md).

mod cifar;
mod dataset;
mod digits;
mod error;
mod loader;

pub use cifar::{load_cifar, read_cifar_file, CifarKind};
pub use dataset::ImageDataset;
pub use digits::{digits, DIGITS_CSV_GZ};
pub use error::{DataError, Result};
pub use loader::{Loader, Normalize};
