//! Layer groups that several families and heads share, written once.

use candle_core::Tensor;
use sgr_core::network::Stage;
use sgr_core::nn::{global_avg_pool, BatchNorm, Conv2d, Ctx, Init, Layer, Linear, Param};
use sgr_core::Result;

/// Global average pool + Linear: the classifier of the ResNets and the `0c1f` aux head
/// (Greedy SL's), named `<name>.weight` and `<name>.bias`.
#[derive(Debug)]
pub struct GapLinear {
    fc: Linear,
}

impl GapLinear {
    /// `Linear(channels → outputs)` named `name`, PyTorch's default initialisation.
    pub fn new(
        name: impl Into<String>,
        init: &mut Init,
        channels: usize,
        outputs: usize,
    ) -> Result<Self> {
        Ok(Self {
            fc: Linear::new(name, init, channels, outputs)?,
        })
    }
}

impl Stage for GapLinear {
    fn forward(&self, x: &Tensor, _ctx: &mut Ctx) -> Result<Tensor> {
        self.fc.forward(&global_avg_pool(x)?)
    }

    fn params(&self) -> Vec<Param> {
        self.fc.params()
    }
}

/// conv (no bias) + BN, with a ReLU after, named as the entries `<i>` and `<i + 1>` of an
/// `nn.Sequential` (the aux heads of InfoPro and DGL).
#[derive(Debug)]
pub struct ConvBnRelu {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBnRelu {
    /// conv `k`×`k` (`cin → cout`, `stride`, `padding`) named `prefix.<conv_index>`, BN named
    /// `prefix.<conv_index + 1>`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        prefix: &str,
        conv_index: usize,
        init: &mut Init,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(
                format!("{prefix}.{conv_index}"),
                init,
                cin,
                cout,
                k,
                stride,
                padding,
            )?,
            bn: BatchNorm::new(format!("{prefix}.{}", conv_index + 1), init, cout)?,
        })
    }

    /// conv → BN → ReLU.
    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        self.bn.forward_act(&self.conv.forward(x)?, None, true, ctx)
    }

    /// The conv's and the BN's tensors.
    pub fn params(&self) -> Vec<Param> {
        let mut p = self.conv.params();
        p.extend(self.bn.params());
        p
    }
}
