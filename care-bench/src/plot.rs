//! PNG plots of acceptance rate against a bucketed feature, one line per workload.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Result;
use plotters::prelude::*;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 500;
const FAMILY: &str = "sans-serif";
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a system font once; false when none loads (the plot then has no text).
fn fonts() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        FONTS.iter().map(PathBuf::from).any(|p| {
            let Ok(bytes) = std::fs::read(&p) else {
                return false;
            };
            // plotters keeps fonts for the process lifetime.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok()
        })
    })
}

/// One line: a name and (bucket label, rate, sample count) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(String, f64, u64)>,
}

/// Draws rates (0–1) per bucket; buckets with fewer than `min_samples` are left out.
pub fn plot_rates(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[Series],
    min_samples: u64,
) -> Result<()> {
    let labels: Vec<String> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0.clone()))
        .fold(Vec::new(), |mut v, l| {
            if !v.contains(&l) {
                v.push(l);
            }
            v
        });
    let text = fonts();
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(20);
        if text {
            builder
                .caption(title, (FAMILY, 22))
                .x_label_area_size(45)
                .y_label_area_size(55);
        }
        let n = labels.len().max(1) as i32;
        let mut chart = builder
            .build_cartesian_2d(-1i32..n, 0f64..1.05f64)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if text {
            let labels_c = labels.clone();
            chart
                .configure_mesh()
                .x_labels(labels.len() + 2)
                .x_label_formatter(&move |i| {
                    usize::try_from(*i)
                        .ok()
                        .and_then(|i| labels_c.get(i).cloned())
                        .unwrap_or_default()
                })
                .x_desc(x_label)
                .y_desc("acceptance rate (accepted / verified)")
                .label_style((FAMILY, 14))
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let colors = [BLUE, RED, GREEN, MAGENTA];
        for (si, s) in series.iter().enumerate() {
            let color = colors[si % colors.len()];
            let pts: Vec<(i32, f64)> = s
                .points
                .iter()
                .filter(|p| p.2 >= min_samples)
                .filter_map(|p| {
                    labels
                        .iter()
                        .position(|l| *l == p.0)
                        .map(|x| (x as i32, p.1))
                })
                .collect();
            let line = chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if text {
                line.label(s.name.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font((FAMILY, 14))
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut file = std::fs::File::create(path)?;
    let mut encoder = png::Encoder::new(&mut file, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&rgb)?;
    writer.finish()?;
    file.flush()?;
    Ok(())
}
