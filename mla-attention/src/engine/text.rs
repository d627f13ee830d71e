//! [`TextStream`]: a request's generated tokens as text, streamed in pieces that never
//! change afterwards, and its stop strings.
//!
//! The semantics are mistral.rs's (and OpenAI's): special tokens are not text; a stop
//! string ends the request and neither it nor anything after it is returned; a stop
//! string may span several tokens and several steps. So a piece is held back while the
//! text ends in an incomplete character or in a prefix of a stop string.

use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// The text of one request so far.
#[derive(Debug)]
pub struct TextStream {
    tokenizer: Arc<Tokenizer>,
    stop_strings: Vec<String>,
    ids: Vec<u32>,
    /// Bytes of text already handed out.
    sent: usize,
    /// A stop string was found: nothing more is handed out.
    stopped: bool,
}

/// What a [`TextStream::push`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextPiece {
    /// New final text.
    pub text: String,
    /// A stop string was found: the text ends before it and the request is over.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(tokenizer: Arc<Tokenizer>, stop_strings: Vec<String>) -> Self {
        TextStream {
            tokenizer,
            stop_strings: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(),
            ids: Vec::new(),
            sent: 0,
            stopped: false,
        }
    }

    fn decode(&self) -> Result<String> {
        self.tokenizer
            .decode(&self.ids, true)
            .map_err(|e| Error::InvalidInput(format!("detokenizing: {e}")))
    }

    /// Appends `tokens`; the text that became final.
    pub fn push(&mut self, tokens: &[u32]) -> Result<TextPiece> {
        if self.stopped {
            return Ok(TextPiece {
                text: String::new(),
                stopped: true,
            });
        }
        self.ids.extend_from_slice(tokens);
        let text = self.decode()?;
        if let Some(cut) = self
            .stop_strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            return Ok(TextPiece {
                text: self.take(&text[..cut]),
                stopped: true,
            });
        }
        let end = text.trim_end_matches('\u{FFFD}').len();
        // Hold back the longest tail that could begin a stop string.
        let mut stable = end;
        for s in &self.stop_strings {
            for (i, _) in s.char_indices().skip(1) {
                if text[..end].ends_with(&s[..i]) {
                    stable = stable.min(end - i);
                }
            }
        }
        let piece = self.take(&text[..stable]);
        Ok(TextPiece {
            text: piece,
            stopped: false,
        })
    }

    /// The request ended (stop token, length): whatever is left.
    pub fn finish(&mut self) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let text = self.decode()?;
        Ok(self.take(&text))
    }

    /// `upto[sent..]`, remembering it as sent (nothing if the text moved under us, which a
    /// tokenizer whose decoding of a longer sequence rewrites earlier characters can do).
    fn take(&mut self, upto: &str) -> String {
        if upto.len() > self.sent && upto.is_char_boundary(self.sent) {
            let piece = upto[self.sent..].to_string();
            self.sent = upto.len();
            piece
        } else {
            String::new()
        }
    }
}
