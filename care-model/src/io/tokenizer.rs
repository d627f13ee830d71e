//! A Hugging Face `tokenizer.json` rebuilt from GGUF metadata.
//!
//! GGUF files carry the BPE vocabulary (`tokenizer.ggml.tokens`), merges
//! (`tokenizer.ggml.merges`), token kinds (`tokenizer.ggml.token_type`: 1 normal,
//! 3 control, 4 user-defined, 5 unused) and the name of the pre-tokenizer
//! (`tokenizer.ggml.pre`). The pre-tokenizer name maps to the HF pipeline that the
//! original model shipped with:
//!
//! | `pre`      | normalizer | pre-tokenizer                                        |
//! |------------|------------|------------------------------------------------------|
//! | `smollm`   | –          | Digits(individual) then ByteLevel(regex)             |
//! | `qwen2`    | NFC        | Split(Qwen2 regex, isolated) then ByteLevel(no regex) |
//! | `llama-bpe`| –          | Split(Llama 3 regex, isolated) then ByteLevel(no regex) |
//! | `default`, `gpt2` | –   | ByteLevel(regex)                                     |
//!
//! Control tokens become special added tokens (matched before BPE, skipped when
//! decoding with `skip_special_tokens`); user-defined tokens become non-special added
//! tokens; unused padding entries stay in the vocabulary only.

use serde_json::{json, Value as Json};

use super::gguf::{GgufFile, Value};
use crate::error::{Error, Result};

const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Build the `tokenizer.json` document for a GGUF file.
pub fn json_from_gguf(file: &GgufFile) -> Result<Json> {
    let path = file.path().display().to_string();
    let bad = |reason: String| Error::Tokenizer(format!("{path}: {reason}"));
    let model = file
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing tokenizer.ggml.model".into()))?;
    if model != "gpt2" {
        return Err(bad(format!(
            "tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)"
        )));
    }
    let strings = |key: &str| -> Result<Vec<&str>> {
        let arr = file
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("missing array {key}")))?;
        arr.iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| bad(format!("{key} holds a non-string")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<u64> = match file
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
    {
        Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(bad(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let (normalizer, pretokenizers) = match pre {
        "smollm" => (
            Json::Null,
            vec![
                json!({"type": "Digits", "individual_digits": true}),
                byte_level(true),
            ],
        ),
        "qwen2" => (
            json!({"type": "NFC"}),
            vec![split(QWEN2_REGEX), byte_level(false)],
        ),
        "llama-bpe" | "llama3" => (Json::Null, vec![split(LLAMA3_REGEX), byte_level(false)]),
        "default" | "gpt2" => (Json::Null, vec![byte_level(true)]),
        other => {
            return Err(bad(format!(
                "pre-tokenizer `{other}` is not supported (smollm, qwen2, llama-bpe, gpt2)"
            )))
        }
    };

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if !vocab.contains_key(*tok) {
            vocab.insert(tok.to_string(), json!(id));
        }
        if ty == 3 || ty == 4 {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": ty == 4, "special": ty == 3
            }));
        }
    }
    for m in &merges {
        if m.split(' ').count() != 2 {
            return Err(bad(format!(
                "merge `{m}` is not two space-separated tokens"
            )));
        }
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizers},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": pre == "llama-bpe",
            "vocab": vocab, "merges": merges,
        }
    }))
}

/// Build a [`tokenizers::Tokenizer`] from GGUF metadata.
pub fn from_gguf(file: &GgufFile) -> Result<tokenizers::Tokenizer> {
    let doc = json_from_gguf(file)?;
    let text = serde_json::to_string(&doc).map_err(|e| Error::Tokenizer(e.to_string()))?;
    text.parse::<tokenizers::Tokenizer>().map_err(|e| {
        Error::Tokenizer(format!(
            "{}: rebuilt tokenizer.json: {e}",
            file.path().display()
        ))
    })
}

/// Encode without special-token post-processing; errors become [`Error::Tokenizer`].
pub fn encode(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    tok.encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| Error::Tokenizer(e.to_string()))
}

/// Decode ids to text, keeping special tokens.
pub fn decode(tok: &tokenizers::Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))
}
