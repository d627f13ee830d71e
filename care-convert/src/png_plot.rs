//! What every PNG chart of the crate shares: a system font registered once with
//! plotters' `ab_glyph` backend, and an atomic PNG writer.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Family name under which a system font is registered with plotters.
pub(crate) const FAMILY: &str = "sans-serif";

/// Places where common distributions keep a sans font, tried before scanning.
const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a system TrueType font once; false when none loads (then charts have axes
/// and lines but no text).
pub(crate) fn fonts_available() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let scanned = find_ttf(Path::new("/usr/share/fonts"), 4);
        FONT_CANDIDATES
            .iter()
            .map(PathBuf::from)
            .chain(scanned)
            .any(|path| {
                let Ok(bytes) = std::fs::read(&path) else {
                    return false;
                };
                // plotters keeps fonts for the life of the process; leak one file's bytes.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font(FAMILY, plotters::style::FontStyle::Normal, bytes)
                    .is_ok()
            })
    })
}

/// First `.ttf` below `dir` (depth-limited), in sorted order for reproducibility.
fn find_ttf(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    entries.iter().find_map(|path| {
        if path.is_dir() && depth > 0 {
            find_ttf(path, depth - 1)
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("ttf"))
        {
            Some(path.clone())
        } else {
            None
        }
    })
}

/// Encode `rgb` (`width × height × 3` bytes) as a PNG at `path` through a temporary file
/// in the same directory, renamed into place when complete.
pub(crate) fn write_png_atomically(
    path: &Path,
    rgb: &[u8],
    width: u32,
    height: u32,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "plot.png".into(), |n| n.to_string_lossy().into_owned());
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        {
            let mut encoder = png::Encoder::new(&mut file, width, height);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
            writer
                .write_image_data(rgb)
                .map_err(std::io::Error::other)?;
            writer.finish().map_err(std::io::Error::other)?;
        }
        file.flush()?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}
