//! CPU-only checks of the WGSL sources: every file in `shaders/` is registered, used by a
//! launcher, and validates with naga. No GPU needed, so shader syntax errors show up anywhere.

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
fn every_shader_validates_with_naga() {
    for (name, source) in tensor::shaders::ALL {
        let module = naga::front::wgsl::parse_str(source).unwrap_or_else(|e| {
            panic!("{name}.wgsl does not parse:\n{}", e.emit_to_string(source))
        });
        let mut validator = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        );
        validator
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}.wgsl is invalid:\n{}", e.emit_to_string(source)));
        assert!(
            !module.entry_points.is_empty(),
            "{name}.wgsl has no entry point"
        );
    }
}
