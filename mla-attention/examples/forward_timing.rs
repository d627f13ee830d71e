use mla_attention::{io::Checkpoint, model::Decoder};
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).expect("gguf path");
    let ckpt = Checkpoint::open(&path)?;
    let model = Decoder::load(&ckpt)?;
    for t in [1usize, 8, 32, 128, 512] {
        let ids: Vec<u32> = (0..t as u32).map(|i| 100 + i).collect();
        let s = std::time::Instant::now();
        let n = 3;
        for _ in 0..n {
            let mut c = model.new_cache();
            let h = model.forward_hidden(&ids, &mut c, None)?;
            let _ = model.logits(&h.narrow(0, t - 1, 1)?)?;
        }
        println!(
            "t={t}: {:.1} ms",
            s.elapsed().as_secs_f64() * 1e3 / n as f64
        );
    }
    Ok(())
}
