//! φ(A1, A2, i, j) as heat maps in one SVG file, like the LoRA paper's figure 3: one panel per
//! site (rows: layers, columns: targets), j across, i down, and a colour bar for φ ∈ [0, 1].
//!
//! Drawn with `plotters`' SVG backend and no font files: text is written as SVG `<text>` in the
//! `sans-serif` family (the viewer's font draws it), and plotters lays it out by its built-in
//! size estimate (its font backend without the `ttf` / `ab_glyph` features). So it builds and
//! runs offline with no system fonts.

use std::path::Path;

use plotters::prelude::*;

use super::Similarities;
use crate::error::{Error, Result};
use crate::target::Target;

/// Size of one site's panel, pixels.
const PANEL: (u32, u32) = (360, 260);
/// Width of the colour bar, and height of the title.
const BAR: u32 = 90;
const TITLE: u32 = 40;

/// Draws every site of `sims` into the SVG file `path`.
pub fn write_heatmap_svg(sims: &Similarities, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    draw(sims, path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw(sims: &Similarities, path: &Path) -> DrawResult {
    let mut layers: Vec<usize> = sims.sites.iter().map(|s| s.layer).collect();
    let mut targets: Vec<Target> = sims.sites.iter().map(|s| s.target).collect();
    layers.sort_unstable();
    layers.dedup();
    targets.sort_unstable();
    targets.dedup();
    let (cols, rows) = (targets.len() as u32, layers.len() as u32);
    let size = (PANEL.0 * cols + BAR, PANEL.1 * rows + TITLE);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "φ(A1, A2, i, j) = ‖U_A1,iᵀ U_A2,j‖²_F / min(i, j)",
        ("sans-serif", 20),
    )?;
    let (grid, bar) = root.split_horizontally(PANEL.0 * cols);
    let panels = grid.split_evenly((rows as usize, cols as usize));
    for s in &sims.sites {
        let row = layers
            .iter()
            .position(|&l| l == s.layer)
            .expect("listed above");
        let col = targets
            .iter()
            .position(|&t| t == s.target)
            .expect("listed above");
        let (r1, r2) = (s.r1(), s.r2());
        // Cell (i, j) is centred on (j, −i): j runs right, i runs down, as in the paper.
        let mut chart = ChartBuilder::on(&panels[row * cols as usize + col])
            .caption(
                format!("h.{} {}", s.layer, s.target.name()),
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(40)
            .build_cartesian_2d(0.5..r2 as f64 + 0.5, -(r1 as f64) - 0.5..-0.5)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(r2.min(8))
            .y_labels(r1.min(8))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{:.0}", -v))
            .x_desc("j")
            .y_desc("i")
            .draw()?;
        let cells = (1..=r1).flat_map(|i| (1..=r2).map(move |j| (i, j)));
        chart.draw_series(cells.map(|(i, j)| {
            let (x, y) = (j as f64, -(i as f64));
            let colour = ViridisRGB.get_color(s.phi(i, j).clamp(0.0, 1.0) as f32);
            Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], colour.filled())
        }))?;
    }
    colour_bar(&bar)?;
    root.present()?;
    Ok(())
}

/// φ from 0 (bottom) to 1 (top) in the heat maps' colours.
fn colour_bar(area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> DrawResult {
    let mut chart = ChartBuilder::on(area)
        .caption("φ", ("sans-serif", 16))
        .margin_top(12)
        .margin_bottom(40)
        .margin_right(20)
        .y_label_area_size(36)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(6)
        .label_style(("sans-serif", 12))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()?;
    let steps = 50;
    chart.draw_series((0..steps).map(|k| {
        let (lo, hi) = (k as f64 / steps as f64, (k + 1) as f64 / steps as f64);
        let colour = ViridisRGB.get_color(((lo + hi) / 2.0) as f32);
        Rectangle::new([(0.0, lo), (1.0, hi)], colour.filled())
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Similarities, SiteSimilarity};
    use super::*;

    #[test]
    fn heat_map_is_written_as_svg() {
        let site = |layer, target, r1: usize, r2: usize| SiteSimilarity {
            layer,
            target,
            phi: (0..r1)
                .map(|i| (0..r2).map(|j| ((i + j) % 5) as f64 / 4.0).collect())
                .collect(),
        };
        let sims = Similarities {
            sites: vec![
                site(0, Target::Q, 8, 64),
                site(0, Target::V, 8, 64),
                site(1, Target::Q, 2, 3),
            ],
        };
        let path = std::env::temp_dir().join(format!("lora-heatmap-{}.svg", std::process::id()));
        write_heatmap_svg(&sims, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(
            svg.contains("h.1 q") && svg.contains("<rect"),
            "panels and cells are drawn"
        );
    }
}
