//! Fine-tuning on E2E NLG (the paper's GPT-2 task) and scoring by BLEU on the held-out MRs.
//!
//! Training: batches of (MR, reference) examples, right-padded, loss on completion tokens only;
//! AdamW (0.9, 0.999, eps 1e-8, weight decay 0.01), gradient-norm clip 1.0, 6 % warm-up then
//! linear decay to 0. Evaluation: greedy decoding of `MR ||` for each held-out MR, stopped at
//! end-of-text or a newline, scored with corpus BLEU-4 against all of its references.

use std::time::Instant;

use autograd::{AdamW, MemoryReport, ParamGroup, Schedule, Trainable, memory::parameter_bytes};
use transformer::{BeamConfig, GenerateConfig, Gpt2, Tokenizer, beam_search, generate};

use crate::batch::{Batches, batch};
use crate::bleu::{Bleu, corpus_bleu};
use crate::e2e::{E2eData, end_of_text, examples};
use crate::metrics::progress;
use crate::slots::SlotAccuracy;
use crate::trainer::{NonFinite, OptimConfig, step};

/// Settings of one fine-tuning run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub steps: u32,
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
    /// Print a progress bar.
    pub progress: bool,
}

/// What a fine-tuning run measured.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub trainable: usize,
    pub steps: u32,
    pub seconds: f64,
    /// Tokens trained on per second: the examples' own tokens, padding not counted (as the
    /// PyTorch recipe of the comparison counts them).
    pub tokens_per_s: f64,
    /// Mean loss over the last 10 % of steps.
    pub final_loss: f32,
    pub memory: MemoryReport,
    /// Training pairs dropped for not fitting the context.
    pub dropped: usize,
    pub losses: Vec<f32>,
}

/// Fine-tune `model`'s trainable parameters (`params`) on the E2E training pairs.
pub fn train_e2e(
    model: &Gpt2,
    params: Vec<Trainable>,
    tok: &Tokenizer,
    data: &E2eData,
    cfg: &RunConfig,
) -> crate::Result<RunReport> {
    let eot = end_of_text(tok);
    let (exs, dropped) = examples(tok, data.train_pairs(), model.config.n_positions);
    let mut order = Batches::new(
        exs.iter().map(|e| e.ids.len()).collect(),
        cfg.batch,
        cfg.seed,
    )
    .with_buckets(8);
    let trainable: usize = params.iter().map(|p| p.value.numel()).sum();
    let mut opt = AdamW::new(vec![ParamGroup::new(params, 0.01)]);
    let warmup = (cfg.steps as f32 * 0.06).round() as u32;
    let optim = OptimConfig {
        lr: cfg.lr,
        schedule: Schedule::WarmupLinear {
            warmup,
            total: cfg.steps,
        },
        clip: 1.0,
    };
    let bar = cfg
        .progress
        .then(|| progress(cfg.steps as u64, "fine-tune"));
    let start = Instant::now();
    let (mut tokens, mut losses) = (0usize, Vec::new());
    let mut peak_activations = autograd::Counter::default();
    let mut grad_peak = 0u64;
    for i in 0..cfg.steps {
        let idx = order.next_batch();
        let rows: Vec<_> = idx.iter().map(|&j| &exs[j]).collect();
        let b = batch(&rows, eot);
        let s =
            step(model, &mut opt, std::slice::from_ref(&b), &optim, i)?.map_err(NonFinite::stop)?;
        tokens += b.lengths.iter().sum::<usize>();
        losses.push(s.loss);
        peak_activations.peak = peak_activations.peak.max(s.saved_peak);
        grad_peak = grad_peak.max(s.grad_bytes);
        if let Some(bar) = &bar {
            let tps = tokens as f64 / start.elapsed().as_secs_f64();
            bar.set_message(format!("loss {:.3} {:.0} tok/s", s.loss, tps));
            bar.inc(1);
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    let seconds = start.elapsed().as_secs_f64();
    let tail = (losses.len() / 10).max(1);
    let final_loss = losses[losses.len() - tail..].iter().sum::<f32>() / tail as f32;
    let memory = MemoryReport {
        parameters: parameter_bytes(model.named_params()),
        gradients: autograd::Counter {
            live: 0,
            peak: grad_peak,
        },
        optimizer: opt.memory(),
        activations: peak_activations,
    };
    Ok(RunReport {
        trainable,
        steps: cfg.steps,
        seconds,
        tokens_per_s: tokens as f64 / seconds,
        final_loss,
        memory,
        dropped,
        losses,
    })
}

/// How the held-out outputs are decoded: greedy (`beams` 1), or beam search as the LoRA paper
/// decodes E2E (length penalty 0.8, no 4-gram repeated; [`BeamConfig::default`]).
pub fn decoding(beams: usize) -> String {
    if beams <= 1 {
        "greedy decoding".into()
    } else {
        format!("beam search of {beams} beams, length penalty 0.8, no repeated 4-gram")
    }
}

/// The held-out MRs scored: corpus BLEU, slot accuracy, and the outputs.
pub struct Heldout {
    pub bleu: Bleu,
    pub slots: SlotAccuracy,
    pub outputs: Vec<String>,
}

/// Outputs for every held-out MR ([`decoding`]`(beams)`, stopped at end-of-text or a newline),
/// their corpus BLEU and slot accuracy.
pub fn score_heldout(
    model: &Gpt2,
    tok: &Tokenizer,
    data: &E2eData,
    beams: usize,
) -> crate::Result<Heldout> {
    let mut outputs = Vec::new();
    if beams > 1 {
        let cfg = BeamConfig {
            beams,
            eot: Some(end_of_text(tok)),
            ..BeamConfig::default()
        };
        for (mr, _) in data.heldout() {
            let prompt = tok.encode(&format!("{mr} ||"));
            let mut ids = beam_search(model, &prompt, &cfg)?;
            if ids.last() == cfg.eot.as_ref() {
                ids.pop();
            }
            let text = tok.decode(&ids);
            let line = text.split('\n').next().unwrap_or_default();
            outputs.push(line.trim().to_string());
        }
    } else {
        let cfg = GenerateConfig {
            max_new_tokens: 64,
            temperature: 0.0,
            stop_at_eot: true,
            stop_strings: vec!["\n".into()],
            ..GenerateConfig::default()
        };
        for chunk in data.heldout().chunks(32) {
            let prompts: Vec<String> = chunk.iter().map(|(mr, _)| format!("{mr} ||")).collect();
            let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
            for g in generate(model, tok, &refs, &cfg)? {
                outputs.push(g.text.trim().to_string());
            }
        }
    }
    let refs: Vec<&[String]> = data.heldout().iter().map(|(_, r)| r.as_slice()).collect();
    let mrs = data.heldout().iter().map(|(mr, _)| mr.as_str());
    Ok(Heldout {
        bleu: corpus_bleu(&outputs, &refs),
        slots: SlotAccuracy::score(mrs, &outputs),
        outputs,
    })
}
