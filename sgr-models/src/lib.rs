//! # sgr-models
//!
//! The model zoo of sgr. Each architecture ships its split definitions (how to cut it into K
//! gradient-isolated modules) and its auxiliary heads next to the architecture.
//!
//! * [`zoo`]: every preset by name, built as a [`sgr_core::network::LocalNetwork`].
//! * [`family`]: the [`ModelFamily`] trait every family implements (presets, backbone, the
//!   channels at each cut, aux heads) and the one build path that does the rest.
//! * [`layers`]: layer groups several families share (GAP + Linear, conv-BN-ReLU).
//! * [`resnet`]: CIFAR ResNets of depth 6n+2 (ResNet-20/32/44/56/110) with the option-A
//!   shortcut, torchvision-style parameter names, InfoPro's split tables.
//! * [`localmixer`]: Ren et al.'s LocalMixer, the model of the BP-free estimators
//!   (`--estimator forward-weight|forward-activity`), presets of their Table 2.
//! * [`heads`]: the auxiliary head kinds (the CIFAR `0c1f` of Greedy SL and `1c2f` of InfoPro,
//!   DGL's MLP-SR head) and the local objectives of each method built on them.
//! * [`split`]: split strategies, published split points, and the memory-balanced split.

pub mod family;
pub mod heads;
pub mod layers;
pub mod localmixer;
pub mod resnet;
pub mod resnet_imagenet;
pub mod split;
pub mod vit;
pub mod zoo;

pub use family::{Backbone, ModelFamily};
pub use heads::HeadKind;
pub use resnet::{CifarResNet, ResNetConfig};
pub use split::SplitStrategy;
pub use zoo::{Input, ModelOptions};
