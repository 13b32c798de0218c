//! `train analyze`: what trained adapters learned, as the LoRA paper's section 7 looks at it.
//!
//! For each adapter (a PEFT directory), the singular values of ΔW = s·B·A per layer and target:
//! how many directions the update uses. For two adapters (`--adapter A --adapter B`: two ranks,
//! or two seeds), the normalised subspace similarity φ(A1, A2, i, j) of their A matrices at every
//! site both adapt, and with `--out` its heat map as SVG (the paper's figure 3). The math is in
//! [`lora::analysis`]. For an AdaLoRA adapter, also where its rank budget went: the rank
//! each layer's matrices kept ([`lora::AdaLoraRanks`]).

use std::path::PathBuf;

use clap::Args;
use lora::{LoraModel, Similarities, Spectra, write_heatmap_svg};
use serde_json::json;
use tensor::Device;

/// Options of `train analyze`.
#[derive(Args, Debug, Clone)]
pub struct AnalyzeArgs {
    /// Base model directory (config.json + model.safetensors) the adapters were trained on.
    /// Or a Hugging Face Hub id, `name` or `org/name`, with `@revision` for a branch, tag or
    /// commit (`org/name@v1`): read from the HF cache ($HF_HUB_CACHE, else $HF_HOME/hub), and
    /// downloaded into it unless HF_HUB_OFFLINE=1. A local path that exists always wins.
    #[arg(long, value_parser = crate::hub::model_dir)]
    pub model: PathBuf,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors), or a Hub id
    /// as for --model; give it twice to compare two adapters.
    #[arg(long, required = true, value_parser = crate::hub::adapter_dir)]
    pub adapter: Vec<PathBuf>,
    /// Draw φ(A1, A2, i, j) of the two adapters into this SVG file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print one JSON object instead of the tables.
    #[arg(long)]
    pub json: bool,
}

/// Loads the adapters, prints their spectra (and φ for two), and writes the heat map.
pub fn run(args: &AnalyzeArgs, device: &Device) -> crate::Result<()> {
    if !(1..=2).contains(&args.adapter.len()) {
        return Err(format!(
            "give one adapter, or two to compare (`--adapter A --adapter B`), not {}",
            args.adapter.len()
        )
        .into());
    }
    if args.out.is_some() && args.adapter.len() != 2 {
        return Err("--out draws the similarity of two adapters: give --adapter twice".into());
    }
    let model = crate::load_model(&args.model, device, false)?;
    let mut adapters = Vec::new();
    for dir in &args.adapter {
        let loaded = LoraModel::load_peft(dir, &model)?;
        for w in &loaded.warnings {
            eprintln!("warning: {}: {w}", dir.display());
        }
        adapters.push(loaded.lora);
    }
    let spectra: Vec<Spectra> = adapters
        .iter()
        .map(Spectra::of)
        .collect::<lora::Result<_>>()?;
    let budgets: Vec<Option<lora::AdaLoraRanks>> = args
        .adapter
        .iter()
        .map(|dir| lora::AdaLoraRanks::read(dir))
        .collect::<lora::Result<_>>()?;
    let similarity = match &adapters[..] {
        [a1, a2] => Some(Similarities::between(a1, a2)?),
        _ => None,
    };
    if let (Some(sims), Some(out)) = (&similarity, &args.out) {
        write_heatmap_svg(sims, out)?;
    }
    if args.json {
        let per_adapter: Vec<_> = args
            .adapter
            .iter()
            .zip(&spectra)
            .zip(&budgets)
            .map(|((dir, s), b)| {
                let mut v = json!({"adapter": dir.display().to_string(), "spectra": s.to_json()});
                if let Some(b) = b {
                    v["adalora"] = b.to_json();
                }
                v
            })
            .collect();
        let mut report = json!({ "adapters": per_adapter });
        if let Some(sims) = &similarity {
            report["similarity"] = sims.to_json();
        }
        println!("{report}");
        return Ok(());
    }
    for (k, (dir, s)) in args.adapter.iter().zip(&spectra).enumerate() {
        println!("adapter {} ({}):\n{s}", k + 1, dir.display());
        if let Some(b) = &budgets[k] {
            println!("{b}");
        }
    }
    if let Some(sims) = &similarity {
        println!(
            "A1 = {}, A2 = {}\n{sims}",
            args.adapter[0].display(),
            args.adapter[1].display()
        );
    }
    if let Some(out) = &args.out {
        println!("heat map written to {}", out.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora::{Init, LoraConfig, Target};

    #[test]
    fn analyze_two_adapters_of_different_rank() {
        let fixture = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/gpt2-tiny"
        ));
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        // The fixture's rank-4 c_attn adapter against a random rank-8 one saved beside it.
        let cpu = Device::cpu();
        let model = crate::load_model(&fixture, &cpu, false).unwrap();
        let mut cfg = LoraConfig::new(8, 16.0, &[Target::CAttn]);
        cfg.init = Init::BothRandom;
        LoraModel::new(&model, &cfg, 5)
            .unwrap()
            .save_peft(dir.join("r8"))
            .unwrap();
        let mut args = AnalyzeArgs {
            model: fixture.clone(),
            adapter: vec![fixture.join("adapter"), dir.join("r8")],
            out: Some(dir.join("phi.svg")),
            json: true,
        };
        run(&args, &cpu).unwrap();
        let svg = std::fs::read_to_string(dir.join("phi.svg")).unwrap();
        assert!(svg.starts_with("<svg"));
        args.json = false;
        run(&args, &cpu).unwrap();
        args.adapter.truncate(1);
        let e = run(&args, &cpu).unwrap_err().to_string();
        assert!(e.contains("give --adapter twice"), "{e}");
        args.out = None;
        run(&args, &cpu).unwrap();
    }
}
