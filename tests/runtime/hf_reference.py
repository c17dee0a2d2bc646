#!/usr/bin/python3
"""Checks an `archipelago export hf` directory the way Hugging Face reads it.

Written from Hugging Face's published LLaMA / Mixtral semantics with plain
PyTorch, not from Archipelago's model code: the safetensors format read by
hand (8-byte little-endian header length, JSON header, raw data), RMSNorm
computed in fp32 with the config's epsilon, rotary embeddings in the
rotate-half convention with the config's theta, grouped-query attention
(key/value head i serves query heads [i*r, (i+1)*r)), SwiGLU, Mixtral's
softmax-top-k router renormalised over the chosen experts, an untied or
tied LM head. The byte tokenizer.json is checked against GPT-2's
bytes-to-unicode table; a SentencePiece tokenizer.model by encoding with
the sentencepiece library.

usage: hf_reference.py EXPORT_DIR TOKENS.bin LOGITS.bin [TEXT.txt IDS.bin]
  TOKENS.bin  int64 token ids of one sequence
  LOGITS.bin  float32 [len(tokens), vocab] logits Archipelago computed
  TEXT.txt / IDS.bin  a text and the int64 ids Archipelago's tokenizer gives it
Prints one JSON line; exits 1 when a check fails.
"""
import json
import math
import struct
import sys

import torch

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    data = blob[8 + n :]
    tensors = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        t = torch.frombuffer(bytearray(data[b:end]), dtype=DTYPES[e["dtype"]])
        tensors[name] = t.reshape(e["shape"]).to(torch.float32)
    return tensors, meta


def rms_norm(x, w, eps):
    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotary(x, theta):
    # x: [heads, T, head_dim]
    hd, t = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return x * emb.cos() + rotate_half(x) * emb.sin()


def attention(x, w, p, cfg):
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    t = x.shape[0]
    q = (x @ w[p + "q_proj.weight"].T).view(t, heads, hd).transpose(0, 1)
    k = (x @ w[p + "k_proj.weight"].T).view(t, kv, hd).transpose(0, 1)
    v = (x @ w[p + "v_proj.weight"].T).view(t, kv, hd).transpose(0, 1)
    q, k = rotary(q, cfg["rope_theta"]), rotary(k, cfg["rope_theta"])
    r = heads // kv
    k = k.repeat_interleave(r, dim=0)
    v = v.repeat_interleave(r, dim=0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores + torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(0, 1).reshape(t, heads * hd) @ w[p + "o_proj.weight"].T


def swiglu(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def mixtral_moe(x, w, p, cfg):
    logits = x @ w[p + "gate.weight"].T
    probs = torch.softmax(logits, dim=-1)
    top_w, top_i = torch.topk(probs, cfg["num_experts_per_tok"], dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(cfg["num_local_experts"]):
        q = p + "experts.%d." % e
        y = swiglu(x, w[q + "w1.weight"], w[q + "w3.weight"], w[q + "w2.weight"])
        weight = (top_w * (top_i == e)).sum(-1, keepdim=True)
        out = out + weight * y
    return out


def forward(w, cfg, ids):
    eps = cfg["rms_norm_eps"]
    h = w["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % layer
        h = h + attention(rms_norm(h, w[p + "input_layernorm.weight"], eps), w, p + "self_attn.", cfg)
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        if cfg["model_type"] == "mixtral":
            h = h + mixtral_moe(x, w, p + "block_sparse_moe.", cfg)
        else:
            h = h + swiglu(x, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
    h = rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return h @ head.T


def gpt2_bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def check_byte_tokenizer(d, text, ids, problems):
    tj = json.load(open(d + "/tokenizer.json"))
    vocab = tj["model"]["vocab"]
    table = gpt2_bytes_to_unicode()
    if tj["model"]["type"] != "BPE" or tj["model"]["merges"]:
        problems.append("tokenizer.json: expected a BPE model without merges")
    for b in range(256):
        if vocab.get(table[b]) != b:
            problems.append("tokenizer.json: byte %d is not id %d" % (b, b))
            break
    if tj["pre_tokenizer"]["type"] != "ByteLevel" or tj["pre_tokenizer"].get("use_regex", True):
        problems.append("tokenizer.json: expected a ByteLevel pre-tokenizer that does not split")
    specials = {t["content"]: t["id"] for t in tj["added_tokens"]}
    if text is not None:
        # BPE without merges over the byte symbols: one id per UTF-8 byte.
        mine = [vocab[table[b]] for b in text.encode("utf-8")]
        if mine != ids:
            problems.append("tokenizer.json encodes the text to other ids than Archipelago's byte tokenizer")
    return {"kind": "byte", "specials": specials}


def check_spm_tokenizer(d, text, ids, problems):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=d + "/tokenizer.model")
    if text is not None and sp.encode(text) != ids:
        problems.append("tokenizer.model encodes the text to other ids than Archipelago's tokenizer")
    return {"kind": "spm", "vocab": sp.get_piece_size()}


def main():
    d, tokens_path, logits_path = sys.argv[1:4]
    cfg = json.load(open(d + "/config.json"))
    w, meta = read_safetensors(d + "/model.safetensors")
    problems = []
    if meta.get("format") != "pt":
        problems.append("model.safetensors metadata format is %r, transformers needs 'pt'" % meta.get("format"))
    ids = torch.tensor(struct.unpack("<%dq" % (len(open(tokens_path, "rb").read()) // 8), open(tokens_path, "rb").read()))
    want = torch.frombuffer(bytearray(open(logits_path, "rb").read()), dtype=torch.float32).reshape(len(ids), -1)
    with torch.no_grad():
        got = forward(w, cfg, ids)
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    # fp32 sums in another order differ by ~1e-6 of the scale; a wrong rule (rotary
    # convention, epsilon, GQA head mapping) moves logits by far more.
    if not diff <= 2e-5 * max(1.0, scale):
        problems.append("logits differ from Archipelago's by %g (scale %g)" % (diff, scale))
    text, text_ids = None, None
    if len(sys.argv) > 5:
        text = open(sys.argv[4], encoding="utf-8").read()
        raw = open(sys.argv[5], "rb").read()
        text_ids = list(struct.unpack("<%dq" % (len(raw) // 8), raw))
    tok_cfg = json.load(open(d + "/tokenizer_config.json"))
    if tok_cfg.get("add_bos_token") or tok_cfg.get("add_eos_token"):
        problems.append("tokenizer_config.json adds BOS/EOS, which the training data did not have")
    import os

    if os.path.exists(d + "/tokenizer.model"):
        tok = check_spm_tokenizer(d, text, text_ids, problems)
    else:
        tok = check_byte_tokenizer(d, text, text_ids, problems)
    print(json.dumps({"max_abs_diff": diff, "logit_scale": scale, "tensors": len(w), "tokenizer": tok, "problems": problems}))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
