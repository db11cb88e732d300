//! # sgr-data
//!
//! Data for sgr: the embedded 8×8 handwritten digits (the default data set, shipped inside the
//! crate); readers for CIFAR-10/100 binary, IDX (MNIST, Fashion-MNIST; raw or gzip), STL-10
//! binary, SVHN (MATLAB v5) and ImageNet-style folders (JPEG/PNG); augmentation transforms; and
//! a deterministic loader that decodes and augments on background threads.
//!
//! Every reader returns a typed [`DataError`] naming the file and the problem on bad input.
//!
//! candle-datasets is not used: its CIFAR reader hard-codes 10 000 records per file, its Hub
//! loader swaps height and width, it has no shuffling or augmentation, and it pulls in a large
//! dependency tree (docs/candle.md).

mod cifar;
mod complete;
mod dataset;
mod digits;
#[cfg(feature = "download")]
pub mod download;
mod error;
mod folder;
mod idx;
mod image;
mod loader;
mod size;
mod stl10;
mod svhn;
pub mod transforms;

pub use cifar::{load_cifar, read_cifar_file, CifarKind};
pub use dataset::ImageDataset;
pub use digits::{digits, DIGITS_CSV_GZ};
pub use error::{DataError, Result};
pub use folder::{ImageFolder, IMAGE_EXTENSIONS};
pub use idx::{load_idx_pair, load_mnist_dir, read_idx};
pub use image::{check_image, decode_rgb, decode_rgb_bytes, Image, Source, Subset, MAX_PIXELS};
pub use loader::{default_workers, Batches, Loader, LoaderConfig, Normalize};
pub use stl10::{load_stl10_dir, load_stl10_pair};
pub use svhn::{load_svhn_dir, load_svhn_mat, read_mat_v5, MatArray, MatData};
pub use transforms::{Pipeline, Transform};
