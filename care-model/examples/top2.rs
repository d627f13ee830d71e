use care_model::{io::tokenizer::encode, io::Checkpoint, model::Decoder};
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let ckpt = Checkpoint::open(&a[1])?;
    let model = Decoder::load(&ckpt)?;
    let text = std::fs::read_to_string(&a[2])?;
    let tok = ckpt.tokenizer()?;
    let ids = encode(tok, &text)?;
    println!("prompt ids {}", ids.len());
    let logits = model.forward(&ids, &mut model.new_cache())?;
    let last = logits.get(logits.dim(0)? - 1)?.to_vec1::<f32>()?;
    let mut idx: Vec<usize> = (0..last.len()).collect();
    idx.sort_by(|&x, &y| last[y].partial_cmp(&last[x]).unwrap());
    for &i in &idx[..4] {
        println!("{i} {:?} {:.6}", tok.id_to_token(i as u32), last[i]);
    }
    Ok(())
}
