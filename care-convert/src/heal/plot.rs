//! `loss.png`: training loss (total, CE, KD) against tokens on the left, held-out
//! perplexity on the right.

use std::path::Path;

use plotters::prelude::*;

use super::train::StepRecord;
use crate::error::{Error, Result};
use crate::png_plot::{fonts_available, write_png_atomically, FAMILY};

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 450;

/// A curve: legend label, colour, value of a record.
type Series = (&'static str, RGBColor, fn(&StepRecord) -> f64);

type DrawResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Draw the curves of `records` with `title` into a PNG at `path` (atomically).
pub fn plot_loss_png(records: &[StepRecord], title: &str, path: &Path) -> Result<()> {
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    draw(records, title, fonts_available(), &mut rgb).map_err(|e| Error::BadData {
        path: path.to_path_buf(),
        reason: format!("drawing the loss curve: {e}"),
    })?;
    write_png_atomically(path, &rgb, WIDTH, HEIGHT).map_err(|e| Error::io(path, e))
}

fn draw(records: &[StepRecord], title: &str, text: bool, rgb: &mut [u8]) -> DrawResult {
    let root = BitMapBackend::with_buffer(rgb, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(WIDTH * 3 / 5);
    let mtok = |r: &StepRecord| r.tokens as f64 / 1e6;
    let x_max = records.iter().map(mtok).fold(1e-3, f64::max);
    let trained: Vec<&StepRecord> = records.iter().filter(|r| r.loss.is_finite()).collect();
    let series: [Series; 3] = [
        ("loss", BLACK, |r| r.loss),
        ("CE", BLUE, |r| r.ce),
        ("KD", RED, |r| r.kd),
    ];
    let y_max = trained
        .iter()
        .flat_map(|r| [r.loss, r.ce, r.kd])
        .fold(1e-3, f64::max)
        * 1.05;
    let mut b = ChartBuilder::on(&left);
    b.margin(15);
    if text {
        b.caption(title, (FAMILY, 18))
            .x_label_area_size(35)
            .y_label_area_size(50);
    }
    let mut chart = b.build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("training tokens (M)")
            .y_desc("loss (nats/token)")
            .label_style((FAMILY, 13))
            .draw()?;
    }
    for (label, color, f) in series {
        let pts: Vec<(f64, f64)> = trained.iter().map(|r| (mtok(r), f(r))).collect();
        let s = chart.draw_series(LineSeries::new(pts, color.stroke_width(2)))?;
        if text {
            s.label(label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FAMILY, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    let evals: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.heldout_ppl.map(|p| (mtok(r), p)))
        .collect();
    let p_max = evals.iter().map(|p| p.1).fold(1.0, f64::max) * 1.05;
    let p_min = evals
        .iter()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .min(p_max)
        * 0.95;
    let mut b = ChartBuilder::on(&right);
    b.margin(15);
    if text {
        b.caption("held-out perplexity", (FAMILY, 18))
            .x_label_area_size(35)
            .y_label_area_size(50);
    }
    let mut chart = b.build_cartesian_2d(0f64..x_max, p_min..p_max)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("training tokens (M)")
            .label_style((FAMILY, 13))
            .draw()?;
    }
    chart.draw_series(LineSeries::new(evals.clone(), GREEN.stroke_width(2)))?;
    chart.draw_series(evals.into_iter().map(|p| Circle::new(p, 3, GREEN.filled())))?;
    root.present()?;
    Ok(())
}
