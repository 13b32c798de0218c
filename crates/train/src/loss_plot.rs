//! The loss plot of a run (`loss.svg`), drawn for a person reading it: each run's raw training
//! loss as a faint line, a smoothed curve over it ([`smooth`]), the held-out loss as points
//! where it was measured, the legend beside the chart rather than over the data, and the final
//! numbers under the title.

use std::path::Path;

use plotters::prelude::*;

/// One run's losses.
#[derive(Clone, Copy, Debug)]
pub struct Curve<'a> {
    pub name: &'a str,
    /// The training loss of each step, step 1 first.
    pub losses: &'a [f32],
    /// `(step, loss)` of each held-out evaluation, in step order (empty when none was made).
    pub heldout: &'a [(u32, f32)],
}

impl Curve<'_> {
    /// The mean training loss of the last tenth of the steps (at least one): what the run ended
    /// at, less noisy than the last step's.
    pub fn final_loss(&self) -> Option<f32> {
        let n = self.losses.len();
        let tail = &self.losses[n - (n / 10).max(1).min(n)..];
        (!tail.is_empty()).then(|| tail.iter().sum::<f32>() / tail.len() as f32)
    }

    /// The numbers the run ended with, for the caption.
    fn summary(&self) -> String {
        let mut text = format!("{}:", self.name);
        if let Some(last) = self.final_loss() {
            text += &format!(" training loss {last:.3} (mean of the last 10 % of steps)");
        }
        if let Some((step, loss)) = self.heldout.last() {
            text += &format!(", held-out loss {loss:.3} at step {step}");
        }
        text
    }
}

/// The half-width of the window [`smooth`] averages over for a run of `n` steps: a fortieth of
/// the run (a window of about 5 %), so the curve keeps the run's shape at any length.
pub fn half_window(n: usize) -> usize {
    n / 40
}

/// `values` smoothed by a centred moving average over `2h + 1` steps (fewer at the ends, where
/// the window is cut to the steps there are). Centred, so a falling curve is not drawn late.
pub fn smooth(values: &[f32], h: usize) -> Vec<f32> {
    (0..values.len())
        .map(|i| {
            let window = &values[i.saturating_sub(h)..(i + h + 1).min(values.len())];
            window.iter().sum::<f32>() / window.len() as f32
        })
        .collect()
}

/// Draw `curves` into the SVG file `path`, titled `title` (see the module docs).
pub fn plot_losses(path: &Path, title: &str, curves: &[Curve]) -> crate::Result<()> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let (width, legend_width) = (960u32, 250u32);
    let header = 40 + 20 * curves.len() as u32;
    let root = SVGBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, rest) = root.split_vertically(header);
    let (plot, legend) = rest.split_horizontally(width - legend_width);

    top.draw(&Text::new(title, (12, 10), ("sans-serif", 20).into_font()))
        .map_err(|e| err(&e))?;
    for (i, c) in curves.iter().enumerate() {
        let at = (12, 38 + 20 * i as i32);
        top.draw(&Text::new(c.summary(), at, ("sans-serif", 14).into_font()))
            .map_err(|e| err(&e))?;
    }

    let steps = curves
        .iter()
        .map(|c| c.losses.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let values = curves.iter().flat_map(|c| {
        let heldout = c.heldout.iter().map(|&(_, l)| l);
        c.losses.iter().copied().chain(heldout)
    });
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.05).max(0.01);
    let mut chart = ChartBuilder::on(&plot)
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(1f32..steps as f32, (lo - pad).max(0.0)..hi + pad)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, c) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let at_step = |values: Vec<f32>| {
            let points = values.into_iter().enumerate();
            points.map(|(s, l)| ((s + 1) as f32, l)).collect::<Vec<_>>()
        };
        let raw = LineSeries::new(at_step(c.losses.to_vec()), color.mix(0.25));
        chart.draw_series(raw).map_err(|e| err(&e))?;
        let smoothed = smooth(c.losses, half_window(c.losses.len()));
        let smoothed = LineSeries::new(at_step(smoothed), color.stroke_width(2));
        chart.draw_series(smoothed).map_err(|e| err(&e))?;
        let heldout: Vec<(f32, f32)> = c.heldout.iter().map(|&(s, l)| (s as f32, l)).collect();
        let dashed = DashedLineSeries::new(heldout.clone(), 6, 4, color.stroke_width(1));
        chart.draw_series(dashed).map_err(|e| err(&e))?;
        let points = heldout.iter().map(|&p| Circle::new(p, 4, color.filled()));
        chart.draw_series(points).map_err(|e| err(&e))?;
    }

    // The legend, beside the chart: three rows a run (raw, smoothed, held-out if measured).
    let font = ("sans-serif", 13).into_font();
    let mut y = 20;
    for (i, c) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let h = half_window(c.losses.len());
        let mut rows: Vec<(String, ShapeStyle)> = vec![
            (format!("{} (per step)", c.name), color.mix(0.25).into()),
            (
                format!("smoothed over {} steps", 2 * h + 1),
                color.stroke_width(2),
            ),
        ];
        if !c.heldout.is_empty() {
            rows.push(("held-out loss".to_string(), color.filled()));
        }
        for (label, style) in rows {
            let mark = PathElement::new(vec![(8, y), (32, y)], style);
            legend.draw(&mark).map_err(|e| err(&e))?;
            if style.filled {
                legend
                    .draw(&Circle::new((20, y), 4, style))
                    .map_err(|e| err(&e))?;
            }
            legend
                .draw(&Text::new(label, (40, y - 7), font.clone()))
                .map_err(|e| err(&e))?;
            y += 22;
        }
        y += 10;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_averages_a_centred_window_cut_at_the_ends() {
        assert_eq!(smooth(&[1.0, 2.0, 3.0, 4.0], 1), [1.5, 2.0, 3.0, 3.5]);
        assert_eq!(smooth(&[5.0, 7.0], 0), [5.0, 7.0]);
        // Noise of ±1 around 2 shrinks to ±0.2 where the window of 5 is whole.
        let noisy: Vec<f32> = (0..40)
            .map(|i| 2.0 + if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let s = smooth(&noisy, 2);
        assert!(
            s[2..38].iter().all(|v| (v - 2.0).abs() <= 0.2 + 1e-6),
            "{s:?}"
        );
    }

    #[test]
    fn the_final_loss_is_the_mean_of_the_last_tenth() {
        let losses: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let c = Curve {
            name: "x",
            losses: &losses,
            heldout: &[(10, 3.0), (20, 2.5)],
        };
        assert_eq!(c.final_loss(), Some(18.5));
        assert_eq!(
            c.summary(),
            "x: training loss 18.500 (mean of the last 10 % of steps), held-out loss 2.500 at step 20"
        );
        let one = Curve {
            name: "y",
            losses: &[4.0],
            heldout: &[],
        };
        assert_eq!(one.final_loss(), Some(4.0));
    }

    /// The SVG holds the title, the caption's numbers and every legend row.
    #[test]
    fn the_svg_has_title_caption_and_legend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        let losses: Vec<f32> = (0..50).map(|i| 3.0 - i as f32 * 0.02).collect();
        let curve = Curve {
            name: "LoRA",
            losses: &losses,
            heldout: &[(25, 2.6), (50, 2.1)],
        };
        plot_losses(&path, "training loss", &[curve]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for want in [
            "training loss",
            "held-out loss 2.100 at step 50",
            "LoRA (per step)",
            "smoothed over 3 steps",
        ] {
            assert!(svg.contains(want), "no `{want}` in the SVG");
        }
        // In the caption and in the legend.
        assert_eq!(svg.matches("held-out loss").count(), 2);
    }
}
