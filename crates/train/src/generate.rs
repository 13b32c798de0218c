//! `train generate`: continue prompts with a model (sampling or beam search, KV cache).

use std::path::PathBuf;

use clap::Args;
use tensor::Device;
use transformer::{BeamConfig, GenerateConfig, beam_search, generate};

/// Options of `train generate`.
#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Model directory: config.json + model.safetensors (+ vocab.json, merges.txt).
    /// Or a Hugging Face Hub id, `name` or `org/name`, with `@revision` for a branch, tag or
    /// commit (`org/name@v1`): read from the HF cache ($HF_HUB_CACHE, else $HF_HOME/hub), and
    /// downloaded into it unless HF_HUB_OFFLINE=1. A local path that exists always wins.
    #[arg(long, value_parser = crate::hub::model_dir)]
    pub model: PathBuf,
    /// A LoRA adapter directory in PEFT's layout (ours or one PEFT saved), applied unmerged.
    /// Give it several times to generate every prompt under each adapter in turn (one bank of
    /// adapters over one base model). Or a Hub id, as for --model.
    #[arg(long, value_parser = crate::hub::adapter_dir)]
    pub adapter: Vec<PathBuf>,
    /// A prompt to continue; give several to generate them as one batch.
    #[arg(long, required_unless_present = "prompt_file")]
    pub prompt: Vec<String>,
    /// A file of prompts, one per line (empty lines skipped), added after any --prompt.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the smallest set of tokens whose probability reaches p (nucleus).
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this string (may be repeated).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Beam search with this many beams instead of sampling (the paper's E2E decoding: 10).
    #[arg(long)]
    pub beams: Option<usize>,
    /// Beam search: score = log-probability / length^penalty.
    #[arg(long, default_value_t = 0.8)]
    pub length_penalty: f32,
    /// Beam search: never repeat an n-gram of this size (0 = off).
    #[arg(long, default_value_t = 4)]
    pub no_repeat_ngram: usize,
    #[command(flatten)]
    pub quant: crate::quantize::QuantizeArgs,
}

/// `train generate`.
pub fn run(args: &GenerateArgs, device: &Device) -> crate::Result<()> {
    let mut prompts = args.prompt.clone();
    if let Some(file) = &args.prompt_file {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        prompts.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    if prompts.is_empty() {
        return Err("no prompt: give --prompt or a --prompt-file with non-empty lines".into());
    }
    if args.adapter.len() < 2 {
        let (model, _lora) = crate::load_with_adapter(
            &args.model,
            args.adapter.first().map(PathBuf::as_path),
            device,
            args.quant,
        )?;
        return generate_all(args, &model, &prompts);
    }
    // Several adapters: one bank over one base, each adapter active in turn.
    let mut model = crate::load_frozen(&args.model, device, args.quant)?;
    let mut bank = lora::AdapterBank::new(&model);
    let names: Vec<String> = args
        .adapter
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    for (name, dir) in names.iter().zip(&args.adapter) {
        for w in bank.load_peft(name, dir, &model)? {
            eprintln!("warning: {w}");
        }
    }
    bank.attach(&mut model)?;
    for name in &names {
        bank.set_active(Some(name))?;
        println!("== adapter {name}");
        generate_all(args, &model, &prompts)?;
    }
    Ok(())
}

/// Generate every prompt with `model` as it is now.
fn generate_all(
    args: &GenerateArgs,
    model: &transformer::Gpt2,
    prompts: &[String],
) -> crate::Result<()> {
    let tokenizer = crate::model_tokenizer(&args.model, &model.config)?;
    if let Some(beams) = args.beams {
        for prompt in prompts {
            let cfg = BeamConfig {
                beams,
                max_new_tokens: args.max_new_tokens,
                length_penalty: args.length_penalty,
                no_repeat_ngram: args.no_repeat_ngram,
                eot: tokenizer.eot(),
            };
            let ids = beam_search(model, &tokenizer.encode(prompt), &cfg)?;
            let ids: Vec<u32> = ids
                .into_iter()
                .filter(|&t| Some(t) != tokenizer.eot())
                .collect();
            println!("{prompt}{}", tokenizer.decode(&ids));
        }
        return Ok(());
    }
    let cfg = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop_at_eot: true,
        stop_strings: args.stop.clone(),
    };
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    for (prompt, g) in prompts
        .iter()
        .zip(generate(model, &tokenizer, &prompts, &cfg)?)
    {
        println!("{prompt}{}", g.text);
        eprintln!("({} tokens, stopped: {:?})", g.tokens.len(), g.stopped);
    }
    Ok(())
}
