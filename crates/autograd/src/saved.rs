//! What a backward rule keeps of a forward activation: the tensor itself, or, on a tape that
//! saves activations in half precision (`--precision f16`), the tensor rounded to f16
//! ([`tensor::ops::half_tensor`]).
//!
//! An op asks [`Tape::save_activation`] for each per-token tensor its backward needs (a layer
//! norm's input, the fused q, k, v, the MLP's pre-activation, a LoRA input), and
//! [`Saved::get`] gives it back as f32 when the rule runs. In f16 the tape holds half the bytes
//! between the passes; the forward values and every sum stay f32, and the rule computes with
//! its saved input rounded to the nearest f16 (a relative 2⁻¹¹ at most). Parameters (W, A, B,
//! γ) and the small per-row statistics (a layer norm's mean and 1/σ, attention's log-sum-exp)
//! are kept as they are: they are few bytes and the gradient is most sensitive to them.

use tensor::ops::half_tensor::HalfTensor;
use tensor::{Result, Tensor};

use crate::tape::{Tape, Var};

/// A tensor kept for backward, in f32 or in f16.
#[derive(Clone)]
pub enum Saved {
    F32(Tensor),
    F16(HalfTensor),
}

impl Saved {
    /// The kept tensor as f32 (widened exactly from f16 when stored so: one pass).
    pub fn get(&self) -> Result<Tensor> {
        match self {
            Saved::F32(t) => Ok(t.clone()),
            Saved::F16(h) => h.unpack(),
        }
    }

    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        match self {
            Saved::F32(t) => t.bytes(),
            Saved::F16(h) => h.bytes(),
        }
    }
}

impl Tape {
    /// From now on, activations saved with [`Tape::save_activation`] are rounded to f16.
    pub fn save_activations_in_f16(&self) {
        self.half_activations.set(true);
    }

    /// Whether this tape saves activations in f16.
    pub fn saves_activations_in_f16(&self) -> bool {
        self.half_activations.get()
    }

    /// Whether an op over `inputs` leaves a node (the tape records and one input needs a
    /// gradient): only then is anything worth saving.
    pub fn records(&self, inputs: &[&Var]) -> bool {
        self.is_recording() && inputs.iter().any(|v| v.requires_grad)
    }

    /// Keep the activation `t` for a backward rule of an op over `inputs`: in f16 on a tape
    /// that saves activations so and records the op; as it is otherwise (an op that leaves no
    /// node pays no conversion).
    pub fn save_activation(&self, t: &Tensor, inputs: &[&Var]) -> Result<Saved> {
        if self.saves_activations_in_f16() && self.records(inputs) {
            Ok(Saved::F16(HalfTensor::pack(t)?))
        } else {
            Ok(Saved::F32(t.clone()))
        }
    }
}

/// Bytes of the saved activations a backward closure keeps (`None`s count 0).
pub fn saved_bytes<'a>(saved: impl IntoIterator<Item = Option<&'a Saved>>) -> u64 {
    saved.into_iter().flatten().map(Saved::bytes).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Grads, Param};
    use tensor::Device;
    use tensor::ops::gelu::gelu_backward;

    fn rounded(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
    }

    /// On an f16 tape GELU's rule sees its saved input rounded to f16, exactly: the gradient is
    /// gelu′ at the rounded x, and the tape counts half the bytes.
    #[test]
    fn a_rule_sees_its_input_rounded_to_f16_and_the_tape_holds_half() {
        let cpu = Device::cpu();
        let v: Vec<f32> = (0..33).map(|i| (i as f32 - 16.0) * 0.1234567).collect();
        for f16 in [false, true] {
            let p = Param::trainable("x", Tensor::from_vec(v.clone(), &[33], &cpu).unwrap());
            let tape = Tape::new();
            if f16 {
                tape.save_activations_in_f16();
            }
            let x = tape.param(&p);
            let y = tape.gelu(&x).unwrap();
            let saved = tape.saved_memory().peak;
            assert_eq!(saved, if f16 { 4 * 17 } else { 4 * 33 });
            let mut grads = Grads::new();
            tape.backward(&y, &mut grads).unwrap();
            let got = grads
                .get(p.as_trainable().unwrap().id)
                .unwrap()
                .to_vec()
                .unwrap();
            let at = if f16 { rounded(&v) } else { v.clone() };
            let ones = Tensor::full(&[33], 1.0, &cpu).unwrap();
            let at = Tensor::from_vec(at, &[33], &cpu).unwrap();
            let want = gelu_backward(&at, &ones).unwrap().to_vec().unwrap();
            assert_eq!(got, want, "f16 {f16}");
            if f16 {
                assert_ne!(rounded(&v), v, "the test values are not all halves");
            }
        }
    }

    /// An op that leaves no node (no input needs a gradient, or the tape does not record)
    /// converts nothing.
    #[test]
    fn nothing_is_packed_for_an_op_that_leaves_no_node() {
        let cpu = Device::cpu();
        let t = Tensor::from_vec(vec![0.1, 0.2, 0.3], &[3], &cpu).unwrap();
        let frozen = Param::frozen("w", t.clone());
        let tape = Tape::new();
        tape.save_activations_in_f16();
        let w = tape.param(&frozen);
        assert!(matches!(
            tape.save_activation(&t, &[&w]).unwrap(),
            Saved::F32(_)
        ));
        let trainable = Param::trainable("a", t.clone());
        let a = tape.param(&trainable);
        let kept = tape.save_activation(&t, &[&w, &a]).unwrap();
        assert!(matches!(kept, Saved::F16(_)));
        assert_eq!(
            kept.get().unwrap().to_vec().unwrap(),
            rounded(&[0.1, 0.2, 0.3])
        );
        let inference = Tape::inference();
        inference.save_activations_in_f16();
        let a = inference.param(&trainable);
        assert!(matches!(
            inference.save_activation(&t, &[&a]).unwrap(),
            Saved::F32(_)
        ));
    }
}
