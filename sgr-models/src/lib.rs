//! # sgr-models
//!
//! The model zoo of sgr. Each architecture ships its split definitions (how to cut it into K
//! gradient-isolated modules) and its auxiliary heads next to the architecture.
//!
//! * [`resnet`]: CIFAR ResNets of depth 6n+2 (ResNet-20/32/44/56/110) with the option-A
//!   shortcut, torchvision-style parameter names, InfoPro's split tables.
//! * [`heads`]: the `0c1f` (Greedy SL) and `1c2f` (InfoPro) auxiliary heads.

pub mod heads;
pub mod resnet;

pub use heads::HeadKind;
pub use resnet::{CifarResNet, ResNetConfig, SplitStrategy};
