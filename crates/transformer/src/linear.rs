//! [`Linear`]: `y = x·W + b` in the layout of Hugging Face's Conv1D, W (in, out), with W dense
//! ([`Weight::Dense`]), frozen in NF4 ([`Weight::Nf4`], QLoRA) or frozen in f16
//! ([`Weight::F16`], `--precision f16`), and the [`Adapter`] hook through which LoRA adds its
//! term.

use autograd::{Param, Tape, Var};
use tensor::Device;
use tensor::ops::matmul::MatmulOpts;
use tensor::ops::matmul_f16::F16Tensor;
use tensor::ops::matmul_nf4::Nf4Tensor;
use tensor::quant::Nf4Weight;

use crate::error::{Error, Result};

/// Something that adds to a linear layer's output: LoRA's (alpha/r)·B·A·x (crates/lora) is one.
/// The base layer stays as it is; the adapter sees the input and the base output.
pub trait Adapter {
    /// `y` is the base output x·W + b, (…, out); return y plus the adapter's term.
    fn apply(&self, tape: &Tape, x: &Var, y: Var) -> Result<Var>;
    /// The adapter's own parameters (trainable ones go to the optimizer).
    fn params(&self) -> Vec<&Param>;
}

/// `y = x·W + b` with W: (in, out) as Hugging Face's Conv1D stores it, plus an optional adapter.
pub struct Linear {
    pub weight: Weight,
    pub bias: Param,
    pub adapter: Option<Box<dyn Adapter>>,
}

/// The W of a [`Linear`]: f32 values (trainable or frozen), frozen NF4 codes (QLoRA), or
/// frozen f16 values (`--precision f16`).
pub enum Weight {
    Dense(Param),
    Nf4(Nf4Linear),
    F16(F16Linear),
}

/// A frozen W stored in f16, in Conv1D's layout (in, out): half the bytes of f32, every product
/// summed in f32 ([`tensor::ops::matmul_f16`]). Made from a frozen f32 weight by
/// [`Weight::to_f16`]; no f32 copy stays on the device.
pub struct F16Linear {
    /// The weight's checkpoint name, e.g. `h.0.attn.c_attn.weight`.
    pub name: String,
    pub halves: F16Tensor,
}

/// A frozen W stored in NF4 as bitsandbytes stores it: Wᵀ, (out, in), quantized in blocks of 64
/// ([`tensor::quant`]). The product dequantizes it on the fly ([`Tape::matmul_nf4`]); no f32
/// copy exists on the device.
pub struct Nf4Linear {
    /// The weight's checkpoint name, e.g. `h.0.attn.c_attn.weight`.
    pub name: String,
    pub codes: Nf4Tensor,
    pub in_features: usize,
    pub out_features: usize,
}

impl Nf4Linear {
    /// Uploads `w`, stored (out, in) as bitsandbytes stores it, as the weight `name`.
    pub fn new(name: &str, w: &Nf4Weight, device: &Device) -> Result<Nf4Linear> {
        let &[out_features, in_features] = w.shape() else {
            return Err(Error::Invalid(format!(
                "NF4 weight `{name}`: shape {:?}, expected (out, in)",
                w.shape()
            )));
        };
        Ok(Nf4Linear {
            name: name.to_string(),
            codes: Nf4Tensor::upload(w, device)?,
            in_features,
            out_features,
        })
    }
}

impl Weight {
    /// The f32 parameter, or an error naming the weight when it is quantized or in f16: `what`
    /// is what needed the f32 values (merging, DoRA, saving a full checkpoint, ...).
    pub fn dense(&self, what: &str) -> Result<&Param> {
        match self {
            Weight::Dense(p) => Ok(p),
            Weight::F16(h) => Err(Error::Invalid(format!(
                "`{}` is stored in f16 (--precision f16); {what} needs its f32 values: run \
                 without --precision f16 (adapters trained on the f16 base are ordinary LoRA \
                 adapters and apply to the f32 base too)",
                h.name
            ))),
            Weight::Nf4(q) => Err(Error::Invalid(format!(
                "`{}` is stored in NF4 (a quantized frozen base); {what} needs its f32 values: \
                 load the model without --quantize (adapters trained on a quantized base are \
                 ordinary LoRA adapters and apply to the f32 base too)",
                q.name
            ))),
        }
    }

    /// The weight's checkpoint name.
    pub fn name(&self) -> &str {
        match self {
            Weight::Dense(p) => p.name(),
            Weight::Nf4(q) => &q.name,
            Weight::F16(h) => &h.name,
        }
    }

    /// W's shape as the model uses it, (in, out), whatever its storage.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            Weight::Dense(p) => {
                let s = p.value().shape();
                [s[0], s.get(1).copied().unwrap_or(1)]
            }
            Weight::Nf4(q) => [q.in_features, q.out_features],
            Weight::F16(h) => h.halves.shape(),
        }
    }

    /// Number of weights (in · out).
    pub fn numel(&self) -> usize {
        match self {
            Weight::Dense(p) => p.value().numel(),
            Weight::Nf4(q) => q.in_features * q.out_features,
            Weight::F16(h) => h.halves.shape().iter().product(),
        }
    }

    /// Device bytes of the stored weight.
    pub fn bytes(&self) -> u64 {
        match self {
            Weight::Dense(p) => p.value().bytes(),
            Weight::Nf4(q) => q.codes.bytes(),
            Weight::F16(h) => h.halves.bytes(),
        }
    }

    /// The weight in f16 if it is a frozen f32 one (its values rounded to the nearest f16);
    /// `None` for one already stored in NF4 or f16. A trainable weight is refused by name
    /// (training needs the f32 values).
    pub fn to_f16(&self) -> Result<Option<Weight>> {
        match self {
            Weight::Dense(p) if p.is_trainable() => Err(Error::Invalid(format!(
                "`{}` is trainable: only a frozen weight can be stored in f16 (train \
                 adapters on the f16 base, or fine-tune the whole model in f32)",
                p.name()
            ))),
            Weight::Dense(p) => {
                let v = p.value();
                let halves = F16Tensor::from_f32(p.name(), &v.to_vec()?, v.shape(), &v.device())?;
                Ok(Some(Weight::F16(F16Linear {
                    name: p.name().to_string(),
                    halves,
                })))
            }
            Weight::Nf4(_) | Weight::F16(_) => Ok(None),
        }
    }
}

impl Linear {
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let b = tape.param(&self.bias);
        let y = match &self.weight {
            Weight::Dense(w) => tape.matmul(x, &tape.param(w), Some(&b), MatmulOpts::default())?,
            // Stored (out, in): y = x·(Wᵀ)ᵀ.
            Weight::Nf4(q) => tape.matmul_stored(x, &q.codes, Some(&b), true)?,
            Weight::F16(h) => tape.matmul_stored(x, &h.halves, Some(&b), false)?,
        };
        match &self.adapter {
            Some(adapter) => adapter.apply(tape, x, y),
            None => Ok(y),
        }
    }

    pub(crate) fn params(&self) -> Vec<&Param> {
        match &self.weight {
            Weight::Dense(w) => vec![w, &self.bias],
            Weight::Nf4(_) | Weight::F16(_) => vec![&self.bias],
        }
    }

    pub(crate) fn params_mut(&mut self) -> Vec<&mut Param> {
        match &mut self.weight {
            Weight::Dense(w) => vec![w, &mut self.bias],
            Weight::Nf4(_) | Weight::F16(_) => vec![&mut self.bias],
        }
    }
}
