//! The default run (`cargo run -p train --release`, no arguments): the paper's story in a few
//! minutes, offline, on whatever device is there.
//!
//! 1. load the shipped base model (`models/base`, pretrained by `train pretrain`);
//! 2. score it on the 118 held-out E2E meaning representations (BLEU, greedy decoding);
//! 3. LoRA-fine-tune it (r 8, alpha 32 on every linear layer) and score again;
//! 4. merge the adapter, check merged = unmerged, time the three inference modes;
//! 5. the paper's own setting (r 4 on q and v) on a fresh copy of the base, same budget;
//! 6. fully fine-tune a fresh copy with the same budget, for comparison;
//! 7. print the table (BLEU and slot accuracy) with samples, and save the run in
//!    `runs/<name>/`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use lora::{LoraConfig, LoraModel, Target};
use tensor::Device;
use transformer::{Checkpoint, Gpt2};

use crate::bleu::corpus_bleu;
use crate::e2e::E2eData;
use crate::finetune::{Heldout, RunConfig, score_heldout, train_e2e};
use crate::latency::inference_latency;
use crate::report::{self, Row};
use crate::slots::SlotAccuracy;

/// Options of the default run (all have defaults; `train run --help` lists them).
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The base model directory.
    #[arg(long, default_value = "models/base")]
    pub model: PathBuf,
    /// The E2E data directory (valid.txt, test.txt).
    #[arg(long, default_value = "data/e2e")]
    pub data: PathBuf,
    /// Where runs are saved (`<runs>/<name>/`).
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    #[arg(long, default_value = "e2e-lora")]
    pub name: String,
    /// Optimizer steps of each fine-tuning run.
    #[arg(long, default_value_t = 450)]
    pub steps: u32,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 8)]
    pub r: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f32,
    /// LoRA targets: any of q, k, v, c_attn, o, fc, proj.
    #[arg(long, value_delimiter = ',', default_value = "c_attn,o,fc,proj")]
    pub targets: Vec<String>,
    #[arg(long, default_value_t = 3e-3)]
    pub lora_lr: f32,
    #[arg(long, default_value_t = 1e-3)]
    pub full_lr: f32,
    /// Skip the full fine-tuning comparison.
    #[arg(long)]
    pub no_full: bool,
    /// Skip the paper's setting (LoRA r 4, alpha 32 on q and v; Hu et al., 2021, Table 11).
    #[arg(long)]
    pub no_paper: bool,
    /// Held-out MRs to score (all 118 by default; fewer for a quick run).
    #[arg(long)]
    pub eval_limit: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train on every reference, also those that leave out the MR's name, food or `near`
    /// (by default they are dropped: [`E2eData::keep_faithful`]).
    #[arg(long)]
    pub all_references: bool,
    /// Decoding of the held-out MRs: 1 is greedy; more is beam search with that many beams
    /// (length penalty 0.8, no repeated 4-gram, as the LoRA paper decodes E2E).
    #[arg(long, default_value_t = 1)]
    pub beams: usize,
    /// QLoRA (`--quantize nf4`) or `--precision f16`: the base (its score and the LoRA runs)
    /// with its Linear weights in NF4 or f16; full fine-tuning keeps the f32 base. Merging needs
    /// f32 weights, so the merge check and the latency table are skipped.
    #[command(flatten)]
    pub quant: crate::quantize::QuantizeArgs,
}

impl RunArgs {
    /// The options as the run directory's `config.json` records them.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model": self.model, "data": self.data, "steps": self.steps, "batch": self.batch,
            "r": self.r, "alpha": self.alpha, "targets": self.targets, "lora_lr": self.lora_lr,
            "full_lr": self.full_lr, "seed": self.seed, "full": !self.no_full,
            "paper": !self.no_paper, "beams": self.beams,
            "all_references": self.all_references,
            "quantize": self.quant.identity(),
        })
    }
}

/// The first reference of the training MR with the most references (the first MR to reach
/// that count, as the PyTorch recipe picks it), output for every held-out MR.
fn constant_baseline(data: &E2eData, heldout: usize) -> crate::Result<Heldout> {
    let mut counts = std::collections::HashMap::new();
    let mut most = ("", 0);
    for (mr, _) in data.train_pairs() {
        let c = counts.entry(mr.as_str()).or_insert(0);
        *c += 1;
        if *c > most.1 {
            most = (mr.as_str(), *c);
        }
    }
    let constant = &data
        .train_pairs()
        .iter()
        .find(|(m, _)| m == most.0)
        .ok_or("no training pairs")?
        .1;
    let outputs = vec![constant.clone(); heldout];
    let refs: Vec<&[String]> = data.heldout()[..heldout]
        .iter()
        .map(|(_, r)| r.as_slice())
        .collect();
    let mrs = data.heldout()[..heldout].iter().map(|(mr, _)| mr.as_str());
    Ok(Heldout {
        bleu: corpus_bleu(&outputs, &refs),
        slots: SlotAccuracy::score(mrs, &outputs),
        outputs,
    })
}

/// A table row from a run's scores.
fn row(
    name: String,
    scores: &Heldout,
    report: Option<crate::finetune::RunReport>,
    total: usize,
) -> Row {
    Row {
        name,
        bleu: scores.bleu.clone(),
        slots: scores.slots.clone(),
        report,
        total_params: total,
    }
}

fn targets(names: &[String]) -> crate::Result<Vec<Target>> {
    Ok(names
        .iter()
        .map(|n| Target::parse(n))
        .collect::<Result<_, _>>()?)
}

/// The default run.
pub fn run(args: &RunArgs, device: &Device) -> crate::Result<()> {
    let started = Instant::now();
    let ckpt = Checkpoint::load(&args.model).map_err(|e| {
        format!("{e}\n(the base model ships in the repository; run from its root, or pass --model)")
    })?;
    let tok = crate::model_tokenizer(&args.model, &ckpt.config)?;
    let mut data = E2eData::load(&args.data)?;
    if let Some(n) = args.eval_limit {
        data.limit_heldout(n);
    }
    let dropped = if args.all_references {
        0
    } else {
        data.keep_faithful()
    };
    let out = args.runs.join(&args.name);
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let cfg = RunConfig {
        steps: args.steps,
        batch: args.batch,
        lr: args.lora_lr,
        seed: args.seed,
        progress: true,
    };
    println!(
        "E2E NLG: {} training pairs ({dropped} whose reference omits the MR's name, food or \
         near left out), {} held-out MRs; {} steps of batch {}",
        data.train_pairs().len(),
        data.heldout().len(),
        cfg.steps,
        cfg.batch
    );

    // The base model, frozen (in NF4 if asked).
    let mut frozen = ckpt.clone();
    args.quant.apply(&mut frozen)?;
    let mut model = Gpt2::from_checkpoint(&frozen, device, false)?;
    args.quant.store(&mut model)?;
    let total = model.num_params();
    let base = score_heldout(&model, &tok, &data, args.beams)?;
    println!("base model: BLEU {:.1}, {}", base.bleu.score, base.slots);
    let constant = constant_baseline(&data, data.heldout().len())?;
    let compact = args.quant.compact_base(frozen.is_quantized());
    let base_form = match compact {
        None => String::new(),
        Some(form) => format!(", {form} base"),
    };

    // LoRA.
    let lcfg = LoraConfig::new(args.r, args.alpha, &targets(&args.targets)?);
    let lora = LoraModel::inject(&mut model, &lcfg, args.seed)?;
    println!("{}", lora.param_count(&model));
    let lora_report = train_e2e(&model, lora.trainable_params(), &tok, &data, &cfg)?;
    let lora_scores = score_heldout(&model, &tok, &data, args.beams)?;
    println!(
        "LoRA: BLEU {:.1}, {} after {:.1} s",
        lora_scores.bleu.score, lora_scores.slots, lora_report.seconds
    );
    lora.save_peft(out.join("adapter"))?;
    let mut rows = vec![
        row("constant output".into(), &constant, None, total),
        row("base model".into(), &base, None, total),
        row(
            format!(
                "LoRA r {} alpha {} ({}){base_form}",
                args.r,
                args.alpha,
                args.targets.join(",")
            ),
            &lora_scores,
            Some(lora_report),
            total,
        ),
    ];

    // Merge, check, time.
    let latency = if let Some(form) = compact {
        format!(
            "merge check and latency: skipped (the base is in {form}, and merging needs its \
             f32 weights; the adapter applies to the f32 base as it is)"
        )
    } else {
        inference_latency(&model, &lora, &tok, &data)?
    };
    drop((lora, model));

    // The paper's setting on a fresh copy of the frozen base: r 4, alpha 32 on q and v.
    if !args.no_paper {
        let mut paper = Gpt2::from_checkpoint(&frozen, device, false)?;
        args.quant.store(&mut paper)?;
        let pcfg = LoraConfig::new(4, 32.0, &[Target::Q, Target::V]);
        let plora = LoraModel::inject(&mut paper, &pcfg, args.seed)?;
        let rep = train_e2e(&paper, plora.trainable_params(), &tok, &data, &cfg)?;
        let scores = score_heldout(&paper, &tok, &data, args.beams)?;
        println!(
            "LoRA r 4 on q,v (the paper's setting): BLEU {:.1}, {} after {:.1} s",
            scores.bleu.score, scores.slots, rep.seconds
        );
        rows.push(row(
            format!("LoRA r 4 alpha 32 (q,v; the paper's){base_form}"),
            &scores,
            Some(rep),
            total,
        ));
    }
    drop(frozen);

    // Full fine-tuning of a fresh copy with the same budget.
    if !args.no_full {
        let full_model = Gpt2::from_checkpoint(&ckpt, device, true)?;
        let params = full_model
            .named_params()
            .into_iter()
            .filter_map(|p| p.as_trainable().cloned())
            .collect();
        let rep = train_e2e(
            &full_model,
            params,
            &tok,
            &data,
            &RunConfig {
                lr: args.full_lr,
                ..cfg.clone()
            },
        )?;
        let scores = score_heldout(&full_model, &tok, &data, args.beams)?;
        println!(
            "full fine-tuning: BLEU {:.1}, {} after {:.1} s",
            scores.bleu.score, scores.slots, rep.seconds
        );
        rows.push(row("full fine-tuning".into(), &scores, Some(rep), total));
    }

    let table = report::table(&rows);
    let samples = report::samples(&data, &lora_scores.outputs, 4);
    println!("\n{table}\nname/food/area/near: share of held-out outputs stating the MR's value\n");
    println!("{samples}{latency}");
    let decoding = crate::finetune::decoding(args.beams);
    let summary = report::Summary {
        table: &table,
        samples: &samples,
        latency: &latency,
        decoding: &decoding,
    };
    report::save_run(&out, &args.to_json(), &rows, &lora_scores.outputs, &summary)?;
    println!(
        "saved the run in {} (adapter in PEFT layout: {}); total time {:.0} s",
        out.display(),
        out.join("adapter").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
