//! The default run's check of a merged adapter and its inference latencies: merged logits must
//! equal unmerged ones, and greedy decoding is timed for the base, the unmerged and the merged
//! model.

use std::time::Instant;

use autograd::Tape;
use lora::LoraModel;
use transformer::{GenerateConfig, Gpt2, Tokenizer, generate};

use crate::e2e::E2eData;

/// Seconds per call of `f`, the best of 3 after a warm-up.
fn best_of(mut f: impl FnMut() -> crate::Result<()>) -> crate::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Merge the adapter, check merged logits equal unmerged ones, and time greedy decoding of 32
/// tokens for the base, the unmerged and the merged model. Leaves the adapter unmerged.
pub fn inference_latency(
    model: &Gpt2,
    lora: &LoraModel,
    tok: &Tokenizer,
    data: &E2eData,
) -> crate::Result<String> {
    let prompt = format!("{} ||", data.heldout()[0].0);
    let ids = tok.encode(&prompt);
    let logits = |m: &Gpt2| -> crate::Result<Vec<f32>> {
        Ok(m.logits(&Tape::inference(), &ids, 1, ids.len())?
            .value
            .to_vec()?)
    };
    let cfg = GenerateConfig {
        max_new_tokens: 32,
        stop_at_eot: false,
        ..GenerateConfig::default()
    };
    let decode = |m: &Gpt2| -> crate::Result<f64> {
        let secs = best_of(|| {
            generate(m, tok, &[prompt.as_str()], &cfg)
                .map(|_| ())
                .map_err(Into::into)
        })?;
        Ok(secs / cfg.max_new_tokens as f64 * 1e3)
    };
    let unmerged = logits(model)?;
    let t_unmerged = decode(model)?;
    lora.merge(model)?;
    let merged = logits(model)?;
    let t_merged = decode(model)?;
    lora.unmerge(model)?;
    let scale = unmerged.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let diff = unmerged
        .iter()
        .zip(&merged)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    if diff > 1e-5 * scale.max(1.0) * 10.0 {
        return Err(
            format!("merged and unmerged logits differ by {diff} (largest logit {scale})").into(),
        );
    }
    // The base: detach the adapter's effect by timing a model without one.
    let base = Gpt2::from_checkpoint(&model.to_checkpoint()?, &model.wte.value().device(), false)?;
    let t_base = decode(&base)?;
    Ok(format!(
        "merged vs unmerged logits: max |diff| {diff:.2e} (largest logit {scale:.2}, relative {:.2e})\n\
         greedy decoding, batch 1, ms per token: base {t_base:.2}, LoRA unmerged {t_unmerged:.2}, LoRA merged {t_merged:.2}",
        diff / scale.max(f32::MIN_POSITIVE)
    ))
}
