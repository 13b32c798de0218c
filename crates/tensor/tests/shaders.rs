//! CPU-only checks of the WGSL sources: every kernel file in `shaders/` is registered, used by
//! a launcher, starts with the prelude `common.wgsl`, and validates with naga. No GPU needed, so
//! shader syntax errors show up anywhere. (The `Params` layouts are checked by a unit test of
//! the crate, which sees the launchers' private structs.)

use std::path::Path;

fn shader_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shaders")
}

#[test]
fn every_shader_file_is_registered() {
    let mut files: Vec<String> = std::fs::read_dir(shader_dir())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".wgsl").map(str::to_string)
        })
        .filter(|name| name != "common")
        .collect();
    files.sort();
    let mut registered: Vec<String> = tensor::shaders::ALL
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    registered.sort();
    assert_eq!(
        files, registered,
        "shaders/ and tensor::shaders::ALL disagree"
    );
}

#[test]
fn every_shader_is_launched_by_its_op_file() {
    for (name, _) in tensor::shaders::ALL {
        let launcher = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("src/ops/{name}.rs"));
        let src = std::fs::read_to_string(&launcher)
            .unwrap_or_else(|e| panic!("{}: {e}", launcher.display()));
        let constant = format!("shaders::{}", name.to_uppercase());
        assert!(
            src.contains(&constant),
            "{} never uses {constant}",
            launcher.display()
        );
    }
}

#[test]
fn every_shader_starts_with_the_prelude_and_does_not_redefine_it() {
    let prelude = std::fs::read_to_string(shader_dir().join("common.wgsl")).unwrap();
    assert_eq!(tensor::shaders::COMMON, prelude);
    for (name, source) in tensor::shaders::ALL {
        // `enable` directives must open a WGSL module: they alone may come before the prelude.
        let body = after_enables(source);
        let own = body
            .strip_prefix(tensor::shaders::COMMON)
            .unwrap_or_else(|| panic!("{name}.wgsl is registered without the prelude"));
        for snippet in ["const LOWEST", "wg.y * nwg.x + wg.x", "var<workgroup> red:"] {
            assert!(
                !own.contains(snippet),
                "{name}.wgsl writes `{snippet}` itself; the prelude has it"
            );
        }
    }
}

/// `source` after its opening `enable …;` lines.
fn after_enables(mut source: &str) -> &str {
    while source.starts_with("enable ") {
        source = source.split_once('\n').map_or("", |(_, rest)| rest);
    }
    source
}

/// The naga capabilities a shader's `enable` directives ask for (the device features the
/// engine asks for before it makes such a pipeline): f16 and cooperative matrices, which the
/// cooperative-matrix kernel uses with subgroup builtins.
fn capabilities(source: &str) -> naga::valid::Capabilities {
    use naga::valid::Capabilities as C;
    let mut caps = C::empty();
    for line in source.lines().take_while(|l| l.starts_with("enable ")) {
        if line.contains("f16") {
            caps |= C::SHADER_FLOAT16;
        }
        if line.contains("wgpu_cooperative_matrix") {
            caps |= C::COOPERATIVE_MATRIX | C::SUBGROUP;
        }
    }
    caps
}

#[test]
fn the_prelude_validates_with_naga_on_its_own() {
    let source = tensor::shaders::COMMON;
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("common.wgsl does not parse:\n{}", e.emit_to_string(source)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::empty(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("common.wgsl is invalid:\n{}", e.emit_to_string(source)));
}

#[test]
fn every_shader_validates_with_naga() {
    let all = tensor::shaders::ALL.iter();
    for (name, source) in all.chain(tensor::shaders::CONFIGURED) {
        let module = naga::front::wgsl::parse_str(source).unwrap_or_else(|e| {
            panic!("{name}.wgsl does not parse:\n{}", e.emit_to_string(source))
        });
        let mut validator =
            naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities(source));
        validator
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}.wgsl is invalid:\n{}", e.emit_to_string(source)));
        assert!(
            !module.entry_points.is_empty(),
            "{name}.wgsl has no entry point"
        );
    }
}
