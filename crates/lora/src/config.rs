//! What to adapt and how: [`LoraConfig`], its validation, and the plan it gives for one model
//! ([`LoraConfig::sites`]: every (layer, target) with its shapes, rank and scale), from which
//! injection allocates and [`LoraConfig::count`] counts without allocating anything.
//!
//! The names follow PEFT's `LoraConfig` where PEFT has one (`r`, `lora_alpha`, `lora_dropout`,
//! `bias`, `init_lora_weights`, `use_rslora`, `rank_pattern`, `alpha_pattern`,
//! `layers_to_transform`); targets are ours, because q, k and v are not modules of GPT-2 but
//! column blocks of the fused `c_attn` (PEFT can only target `c_attn` as a whole).

use std::collections::BTreeMap;
use std::fmt;

use transformer::GptConfig;

use crate::error::{Error, Result};
use crate::name_patterns::NamePatterns;
use crate::target::Target;

/// Which biases train along with the adapters (PEFT's `bias`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasMode {
    /// No bias trains (the default).
    None,
    /// Every bias of the model, layer norms' β included.
    All,
    /// The biases of the Linears that carry an adapter (all of `c_attn`'s for a q/k/v target).
    LoraOnly,
}

impl BiasMode {
    pub fn name(self) -> &'static str {
        match self {
            BiasMode::None => "none",
            BiasMode::All => "all",
            BiasMode::LoraOnly => "lora_only",
        }
    }

    pub fn parse(name: &str) -> Result<BiasMode> {
        match name {
            "none" => Ok(BiasMode::None),
            "all" => Ok(BiasMode::All),
            "lora_only" => Ok(BiasMode::LoraOnly),
            _ => Err(Error::config(format!(
                "unknown bias mode `{name}`; known: none, all, lora_only"
            ))),
        }
    }
}

/// How A and B start (PEFT's `init_lora_weights`, as its `reset_lora_parameters` does it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// PEFT's `true`, the default: A ~ kaiming_uniform(a = √5), which for A: (r, in) is
    /// U(−1/√in, 1/√in) (gain √(2/(1+a²)) = √(1/3), bound = gain·√3/√fan_in = 1/√in), and B = 0.
    KaimingUniform,
    /// PEFT's `"gaussian"`: A ~ N(0, (1/r)²), B = 0.
    Gaussian,
    /// PEFT's `false`: nothing is reset, so both keep `nn.Linear`'s default init,
    /// A ~ U(±1/√in) and B ~ U(±1/√r). The model does not start at W0; for tests only.
    BothRandom,
    /// PEFT's `"pissa"`: A and B from the top-r SVD of W0, and W0 becomes the residual
    /// (see [`crate::base_init`]). Saved converted to a plain LoRA of rank 2r.
    Pissa,
    /// PEFT's `"olora"`: A and B from the QR decomposition of W0, and W0 becomes the residual
    /// (see [`crate::base_init`]). Saved converted to a plain LoRA of rank 2r.
    Olora,
}

impl Init {
    /// Whether this init changes W0 (the adapter then only makes sense with the residual, and
    /// is saved converted to a plain LoRA).
    pub fn changes_base(self) -> bool {
        matches!(self, Init::Pissa | Init::Olora)
    }

    /// The name of `train finetune --init` and of PEFT's `init_lora_weights`.
    pub fn name(self) -> &'static str {
        match self {
            Init::KaimingUniform => "default",
            Init::Gaussian => "gaussian",
            Init::BothRandom => "both-random",
            Init::Pissa => "pissa",
            Init::Olora => "olora",
        }
    }
}

/// What to adapt and how. `LoraConfig::new(8, 16.0, &[Target::Q, Target::V])` is the paper's
/// GPT-2 setting with α = 2r.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// r: the rank of every update unless `rank_pattern` says otherwise.
    pub r: usize,
    /// α: the update is scaled by α/r (or α/√r with `use_rslora`).
    pub alpha: f32,
    pub targets: Vec<Target>,
    /// Blocks to adapt (`None`: all), PEFT's `layers_to_transform`.
    pub layers: Option<Vec<usize>>,
    /// Rank per target, overriding `r` (PEFT's `rank_pattern`).
    pub rank_pattern: BTreeMap<Target, usize>,
    /// α per target, overriding `alpha` (PEFT's `alpha_pattern`).
    pub alpha_pattern: BTreeMap<Target, f32>,
    /// Dropout probability on the adapter's input x (the base path sees x undropped).
    pub dropout: f32,
    pub bias: BiasMode,
    pub init: Init,
    /// Rank-stabilised LoRA (Kalajdzievski 2023): scale α/√r instead of α/r.
    pub use_rslora: bool,
    /// PEFT's `rank_pattern` by module name: (regular expression, rank), the first key in this
    /// order that matches `transformer.h.{i}.{module}` as PEFT matches it
    /// (`peft_pattern.rs`'s rule `(.*\.)?(key)$`) gives the rank; before `rank_pattern`.
    pub name_rank_pattern: Vec<(String, usize)>,
    /// PEFT's `alpha_pattern` by module name, as `name_rank_pattern`.
    pub name_alpha_pattern: Vec<(String, f32)>,
    /// PEFT's `modules_to_save`: modules (`ln_f`, `h.0.ln_2`, `h.1.mlp.c_fc`: the end of a
    /// module's full name, as PEFT matches them) whose every parameter trains and is saved
    /// whole with the adapter.
    pub modules_to_save: Vec<String>,
    /// DoRA (PEFT's `use_dora`): a trainable magnitude per output column, see [`crate::dora`].
    pub use_dora: bool,
}

impl Default for LoraConfig {
    /// PEFT's defaults for GPT-2: r 8, α 8, target `c_attn`, no dropout, no bias.
    fn default() -> Self {
        LoraConfig::new(8, 8.0, &[Target::CAttn])
    }
}

/// The scale of an update of rank r: α/r, or α/√r with rsLoRA.
pub fn scaling(alpha: f32, r: usize, use_rslora: bool) -> f32 {
    if use_rslora {
        alpha / (r as f32).sqrt()
    } else {
        alpha / r as f32
    }
}

/// One adapted place of one model: target `target` of block `layer`.
#[derive(Clone, Debug, PartialEq)]
pub struct Site {
    pub layer: usize,
    pub target: Target,
    /// in: rows of W, columns of A (r, in).
    pub in_features: usize,
    /// First column of the Linear's output the update adds into.
    pub col0: usize,
    /// width: columns it adds into, rows of B (width, r).
    pub width: usize,
    pub r: usize,
    pub alpha: f32,
    /// s = α/r (or α/√r).
    pub scale: f32,
}

impl Site {
    /// Parameters of A and B: r·(in + width).
    pub fn numel(&self) -> usize {
        self.r * (self.in_features + self.width)
    }
}

impl LoraConfig {
    /// Rank r and α for `targets`; everything else at PEFT's defaults.
    pub fn new(r: usize, alpha: f32, targets: &[Target]) -> LoraConfig {
        LoraConfig {
            r,
            alpha,
            targets: targets.to_vec(),
            layers: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            dropout: 0.0,
            bias: BiasMode::None,
            init: Init::KaimingUniform,
            use_rslora: false,
            name_rank_pattern: Vec::new(),
            name_alpha_pattern: Vec::new(),
            modules_to_save: Vec::new(),
            use_dora: false,
        }
    }

    /// Rank of `target`.
    pub fn rank(&self, target: Target) -> usize {
        self.rank_pattern.get(&target).copied().unwrap_or(self.r)
    }

    /// α of `target`.
    pub fn alpha_of(&self, target: Target) -> f32 {
        self.alpha_pattern
            .get(&target)
            .copied()
            .unwrap_or(self.alpha)
    }

    /// Checks what can be checked without a model.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::config(m));
        if self.targets.is_empty() {
            return err("no targets: name at least one of q, k, v, c_attn, o, fc, proj".into());
        }
        for (i, t) in self.targets.iter().enumerate() {
            if self.targets[..i].contains(t) {
                return err(format!("target `{}` is listed twice", t.name()));
            }
        }
        let slices = [Target::Q, Target::K, Target::V];
        if self.targets.contains(&Target::CAttn)
            && let Some(s) = self.targets.iter().find(|t| slices.contains(t))
        {
            return err(format!(
                "targets `c_attn` and `{}` overlap: `c_attn` already covers q, k and v",
                s.name()
            ));
        }
        for t in &self.targets {
            let (r, alpha) = (self.rank(*t), self.alpha_of(*t));
            if r == 0 {
                return err(format!(
                    "rank of target `{}` is 0; it must be at least 1",
                    t.name()
                ));
            }
            if !(alpha.is_finite() && alpha > 0.0) {
                return err(format!(
                    "alpha of target `{}` is {alpha}; it must be > 0",
                    t.name()
                ));
            }
        }
        for t in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            if !self.targets.contains(t) {
                return err(format!(
                    "rank_pattern/alpha_pattern name `{}`, which is not a target",
                    t.name()
                ));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return err(format!("dropout {} is outside [0, 1)", self.dropout));
        }
        if self.use_dora {
            if let Some(s) = self.targets.iter().find(|t| slices.contains(t)) {
                return err(format!(
                    "DoRA on `{}`: its magnitude is per output column of a whole module, and \
                     PEFT adapts c_attn as a whole; target c_attn instead",
                    s.name()
                ));
            }
            if self.init.changes_base() {
                return err(format!(
                    "DoRA with the {} init: the adapter could not be saved as a plain LoRA on \
                     the original weights (DoRA is not additive)",
                    self.init.name()
                ));
            }
            if self.dropout > 0.0 {
                return err(format!(
                    "DoRA with dropout {}: PEFT then rescales the base output of the dropped \
                     input while training, which this forward does not compute; use dropout 0",
                    self.dropout
                ));
            }
        }
        if let Some(layers) = &self.layers {
            if layers.is_empty() {
                return err("`layers` is empty; use None to adapt every layer".into());
            }
            for (i, l) in layers.iter().enumerate() {
                if layers[..i].contains(l) {
                    return err(format!("layer {l} is listed twice"));
                }
            }
        }
        Ok(())
    }

    /// [`LoraConfig::validate`], and that the layers exist in a model of config `gpt`.
    pub fn validate_for(&self, gpt: &GptConfig) -> Result<()> {
        self.validate()?;
        if let Some(&l) = self.layers.iter().flatten().find(|&&l| l >= gpt.n_layer) {
            return Err(Error::config(format!(
                "layer {l} does not exist: the model has {}",
                layers_phrase(gpt.n_layer)
            )));
        }
        let shapes = transformer::parameter_shapes(gpt);
        for m in &self.modules_to_save {
            if m.is_empty() {
                return Err(Error::config("modules_to_save holds an empty name"));
            }
            if module_saved(std::slice::from_ref(m), "wte.weight") {
                return Err(Error::config(format!(
                    "modules_to_save `{m}` names the token embedding `wte`, which is tied to the \
                     output head here, while PEFT would train a copy for the input side only"
                )));
            }
            if !shapes
                .iter()
                .any(|(n, _)| module_saved(std::slice::from_ref(m), n))
            {
                return Err(Error::config(format!(
                    "modules_to_save `{m}` names no module of the model (e.g. ln_f, h.0.ln_1, \
                     h.0.mlp.c_fc)"
                )));
            }
        }
        Ok(())
    }

    /// The blocks to adapt, ascending.
    pub fn layer_list(&self, n_layer: usize) -> Vec<usize> {
        let mut layers = self
            .layers
            .clone()
            .unwrap_or_else(|| (0..n_layer).collect());
        layers.sort_unstable();
        layers
    }

    /// Every (layer, target) this config adapts in a model of config `gpt`, layer by layer,
    /// targets in the order of [`Target::ALL`].
    pub fn sites(&self, gpt: &GptConfig) -> Result<Vec<Site>> {
        self.validate_for(gpt)?;
        let mut targets = self.targets.clone();
        targets.sort();
        let mut names = NamePatterns::new(self)?;
        let mut sites = Vec::new();
        for layer in self.layer_list(gpt.n_layer) {
            for &target in &targets {
                let module = format!("transformer.h.{layer}.{}", target.module().path());
                let (r, alpha) =
                    names.rank_alpha(&module, self.rank(target), self.alpha_of(target))?;
                let (col0, width) = target.columns(gpt);
                sites.push(Site {
                    layer,
                    target,
                    in_features: target.module().shape(gpt).0,
                    col0,
                    width,
                    r,
                    alpha,
                    scale: scaling(alpha, r, self.use_rslora),
                });
            }
        }
        names.all_used()?;
        for site in &sites {
            let module = format!("h.{}.{}", site.layer, site.target.module().path());
            if let Some(m) = self
                .modules_to_save
                .iter()
                .find(|m| module_saved(std::slice::from_ref(m), &format!("{module}.weight")))
            {
                return Err(Error::config(format!(
                    "modules_to_save `{m}` names {module}, which also carries an adapter"
                )));
            }
        }
        Ok(sites)
    }

    /// Trainable and total parameters of a model of config `gpt` with these adapters, from the
    /// size table alone (nothing is allocated).
    pub fn count(&self, gpt: &GptConfig) -> Result<ParamCount> {
        let sites = self.sites(gpt)?;
        let lora: usize = sites.iter().map(Site::numel).sum();
        let biases: usize = transformer::parameter_shapes(gpt)
            .iter()
            .filter(|(name, _)| {
                bias_trains(self.bias, name, &sites) || module_saved(&self.modules_to_save, name)
            })
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum();
        Ok(ParamCount {
            trainable: lora + biases,
            all: transformer::num_parameters(gpt) + lora,
        })
    }
}

/// "1 layer (h.0)", "12 layers (h.0..h.11)": for error messages.
pub(crate) fn layers_phrase(n_layer: usize) -> String {
    match n_layer {
        0 => "no layers".into(),
        1 => "1 layer (h.0)".into(),
        n => format!("{n} layers (h.0..h.{})", n - 1),
    }
}

/// Whether the model parameter `name` (size-table name) trains under `mode` given `sites`.
pub(crate) fn bias_trains(mode: BiasMode, name: &str, sites: &[Site]) -> bool {
    match mode {
        BiasMode::None => false,
        BiasMode::All => name.ends_with(".bias"),
        BiasMode::LoraOnly => sites
            .iter()
            .any(|s| name == format!("h.{}.{}.bias", s.layer, s.target.module().path())),
    }
}

/// Whether the model parameter `name` (size-table name) belongs to a module of
/// `modules_to_save`: the module's full name (`transformer.ln_f`) ends with an entry, PEFT's
/// rule (`key.endswith(target_key)`, so `ln_2` names every block's, and so does `2`).
pub(crate) fn module_saved(modules: &[String], name: &str) -> bool {
    let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
    let full = format!("transformer.{module}");
    modules.iter().any(|m| full.ends_with(m.as_str()))
}

/// Parameter counts as PEFT's `print_trainable_parameters` prints them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCount {
    /// Parameters the optimizer sees: A, B and any trainable biases.
    pub trainable: usize,
    /// Base model plus adapters.
    pub all: usize,
}

/// `1234567` → `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

impl fmt::Display for ParamCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = 100.0 * self.trainable as f64 / self.all.max(1) as f64;
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {pct:.4}",
            thousands(self.trainable),
            thousands(self.all)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_print_as_peft_prints_them() {
        let c = ParamCount {
            trainable: 294_912,
            all: 124_734_720,
        };
        assert_eq!(
            c.to_string(),
            "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"
        );
        assert_eq!(thousands(7), "7");
        assert_eq!(thousands(1000), "1,000");
    }

    #[test]
    fn invalid_configs_say_what_is_wrong() {
        let msg = |cfg: LoraConfig| cfg.validate().unwrap_err().to_string();
        assert!(msg(LoraConfig::new(0, 8.0, &[Target::Q])).contains("rank of target `q` is 0"));
        assert!(msg(LoraConfig::new(4, 8.0, &[])).contains("no targets"));
        assert!(msg(LoraConfig::new(4, 8.0, &[Target::CAttn, Target::V])).contains("overlap"));
        assert!(msg(LoraConfig::new(4, 8.0, &[Target::Q, Target::Q])).contains("twice"));
        assert!(msg(LoraConfig::new(4, -1.0, &[Target::O])).contains("must be > 0"));
        let mut cfg = LoraConfig::new(4, 8.0, &[Target::Q]);
        cfg.dropout = 1.0;
        assert!(msg(cfg.clone()).contains("outside [0, 1)"));
        cfg.dropout = 0.1;
        cfg.rank_pattern.insert(Target::V, 2);
        assert!(msg(cfg.clone()).contains("not a target"));
        cfg.rank_pattern.clear();
        cfg.layers = Some(vec![0, 5]);
        cfg.validate_for(&GptConfig::gpt2_small()).unwrap();
        cfg.layers = Some(vec![12]);
        let e = cfg.validate_for(&GptConfig::gpt2_small()).unwrap_err();
        assert!(
            e.to_string()
                .contains("layer 12 does not exist: the model has 12 layers (h.0..h.11)"),
            "{e}"
        );
        assert!(
            Target::parse("qkv")
                .unwrap_err()
                .to_string()
                .contains("known: q, k, v")
        );
        assert!(BiasMode::parse("some").is_err());
    }
}
