#!/usr/bin/env python3
"""Compare QLoRA Studio's outputs with transformers + PEFT (fp32).

Input: the folder built by scripts/device/prepare-reference-check.mjs (default .device/refcheck), holding
expected.json (our `score --json` for each case and sequence: base model, with our adapter, our merged model),
the models, adapters and merged models, and our bnb-4bit checkpoint beside the reference one.

For each case:
  tokenizer   AutoTokenizer loads the tiny model's tokenizer and encodes the samples (and the chat template renders
              and encodes the chat) to the ids our tokenizer gave;
  load        AutoModelForCausalLM.from_pretrained(model, fp32) loads with no missing/unexpected weights;
  base        loss and next-token log-probs (labels = ids) vs our `score`, max abs diff <= tol;
  peft        PeftModel.from_pretrained(base, our adapter) vs our `score --adapter`;
  peft_merge  merge_and_unload() vs our merged model's scores, and vs our `score --adapter`;
  our_merge   transformers loading our merged folder vs our merged scores and vs PEFT's merge, and the merged
              weights themselves vs PEFT's merged weights.
Plus the bnb-4bit layout (tensor names, dtypes, shapes, quant_state JSON) of our checkpoint vs the reference one,
read with plain Python (bitsandbytes is not needed).

Writes <out>/reference_check.json (out: --out, else $OUT, else the bundle folder) with every comparison, prints a
summary, exits 1 if any check failed (or errored). Needs only torch, transformers and peft.

  python3 scripts/device/reference_check.py .device/refcheck [--device cpu|cuda|cpu,cuda] [--out DIR]
"""
import argparse
import json
import math
import os
import platform
import struct
import sys
import time
import traceback

RESULTS = []  # every check: dict(case, device, check, sequence, passed, max_abs_diff, tol, detail, error)


def record(case, device, check, passed, sequence=None, max_abs_diff=None, tol=None, detail=None, error=None):
    row = {
        "case": case,
        "device": device,
        "check": check,
        "sequence": sequence,
        "passed": bool(passed),
        "max_abs_diff": max_abs_diff,
        "tol": tol,
    }
    if detail is not None:
        row["detail"] = detail
    if error is not None:
        row["error"] = error
    RESULTS.append(row)
    status = "PASS" if passed else "FAIL"
    diff = "" if max_abs_diff is None else " max|diff|=%.3g" % max_abs_diff
    seq = "" if sequence is None else " [%s]" % sequence
    msg = "" if error is None else " ERROR: " + error.strip().splitlines()[-1]
    print("%s %s/%s %s%s%s%s" % (status, case, device, check, seq, diff, msg), flush=True)
    return row


def error_text():
    return traceback.format_exc(limit=6)


# ------------------------------------------------------------------------------------------------ safetensors


def read_safetensors_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n).decode("utf-8"))
        base = 8 + n
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            f.seek(base + a)
            data = f.read(b - a)
            tensors[name] = {"dtype": info["dtype"], "shape": info["shape"], "data": data}
    return tensors


def check_bnb4_layout(bundle, expected):
    """Our bnb-4bit checkpoint vs the reference one: names, dtypes, shapes, quant_state JSON, and bytes."""
    info = expected.get("bnb4_layout") or {}
    case = "bnb4-dq"
    # What the prepare script found on the development machine.
    record(case, "-", "prepare_side_layout", info.get("layout_ok", False),
           detail={"byte_identical": info.get("byte_identical"),
                   "tensors_byte_identical": info.get("tensors_byte_identical"),
                   "data_mismatch": info.get("data_mismatch")})
    try:
        ours = read_safetensors_header(os.path.join(bundle, info.get("ours", "ours-bnb4-dq"), "model.safetensors"))
        ref = read_safetensors_header(os.path.join(bundle, info.get("reference", "llama-shared-bnb4-dq"), "model.safetensors"))
        names_ok = sorted(ours) == sorted(ref)
        record(case, "-", "tensor_names", names_ok,
               detail={"missing_in_ours": sorted(set(ref) - set(ours)), "extra_in_ours": sorted(set(ours) - set(ref))})
        bad_meta = []
        bad_qs = []
        differing = []
        for name in sorted(set(ours) & set(ref)):
            o, r = ours[name], ref[name]
            if o["dtype"] != r["dtype"] or list(o["shape"]) != list(r["shape"]):
                bad_meta.append({"name": name, "ours": [o["dtype"], o["shape"]], "reference": [r["dtype"], r["shape"]]})
                continue
            if ".quant_state." in name:
                oj = json.loads(o["data"].decode("utf-8"))
                rj = json.loads(r["data"].decode("utf-8"))
                oo, ro = oj.pop("nested_offset", None), rj.pop("nested_offset", None)
                off_ok = oo == ro or (isinstance(oo, (int, float)) and isinstance(ro, (int, float))
                                      and abs(oo - ro) <= 1e-7 * max(1.0, abs(ro)))
                if oj != rj or not off_ok:
                    bad_qs.append({"name": name, "ours": oj, "reference": rj, "nested_offset": [oo, ro]})
            if o["data"] != r["data"]:
                differing.append(name)
        record(case, "-", "tensor_dtypes_shapes", not bad_meta, detail=bad_meta or None)
        record(case, "-", "quant_state_json", not bad_qs, detail=bad_qs or None)
        # Informational bytes check: reported, counted as a check (the formats are meant to match to the bit).
        record(case, "-", "tensor_bytes_identical", not differing,
               detail={"differing": differing, "compared": len(set(ours) & set(ref))})
    except Exception:
        record(case, "-", "bnb4_layout", False, error=error_text())


# ------------------------------------------------------------------------------------------------ models


def version_tuple(v):
    out = []
    for part in str(v).split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    while len(out) < 2:
        out.append(0)
    return tuple(out)


class Env:
    def __init__(self):
        import torch
        import transformers
        import peft

        self.torch = torch
        self.transformers = transformers
        self.peft = peft
        # transformers >= 4.56 takes dtype=, older ones torch_dtype= (5.x still accepts torch_dtype, deprecated).
        self.dtype_keys = ["dtype", "torch_dtype"] if version_tuple(transformers.__version__) >= (4, 56) else ["torch_dtype", "dtype"]
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            torch.backends.cudnn.allow_tf32 = False
        except Exception:
            pass

    def load_model(self, path, device):
        """AutoModelForCausalLM in fp32, eval mode, on device; returns (model, loading_info or None)."""
        torch = self.torch
        AutoModelForCausalLM = self.transformers.AutoModelForCausalLM
        last = None
        for dtype_key in self.dtype_keys:
            for extra in ({"attn_implementation": "eager", "output_loading_info": True},
                          {"output_loading_info": True},
                          {}):
                kwargs = dict(extra)
                kwargs[dtype_key] = torch.float32
                try:
                    got = AutoModelForCausalLM.from_pretrained(path, **kwargs)
                except (TypeError, ValueError) as e:
                    last = e
                    continue
                if isinstance(got, tuple):
                    model, info = got[0], got[1]
                else:
                    model, info = got, None
                model = model.float().to(device)
                model.eval()
                return model, info
        raise last

    def scores(self, model, ids, device):
        """(loss from the model with labels=ids, loss recomputed, next-token log-probs) in fp32."""
        torch = self.torch
        x = torch.tensor([ids], dtype=torch.long, device=device)
        with torch.no_grad():
            out = model(input_ids=x, labels=x)
            logits = out.logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            nt = lp[:-1].gather(1, x[0, 1:].unsqueeze(1)).squeeze(1)
        nt = [float(v) for v in nt.cpu().tolist()]
        return float(out.loss.float().cpu()), -sum(nt) / len(nt), nt


def max_diff(a, b):
    """Max abs diff between two {loss, next_token_logprobs}; None when the lengths differ."""
    la, lb = a["next_token_logprobs"], b["next_token_logprobs"]
    if len(la) != len(lb):
        return None
    d = 0.0
    for x, y in [(a["loss"], b["loss"])] + list(zip(la, lb)):
        e = abs(float(x) - float(y))
        if not math.isfinite(e):  # max() would skip a NaN
            return float("inf")
        d = max(d, e)
    return d


def compare(case, device, check, seq_name, theirs, ours, tol):
    d = max_diff(theirs, ours)
    if d is None:
        return record(case, device, check, False, sequence=seq_name, tol=tol,
                      detail={"lengths": [len(theirs["next_token_logprobs"]), len(ours["next_token_logprobs"])]})
    return record(case, device, check, d <= tol and d == d, sequence=seq_name, max_abs_diff=d, tol=tol,
                  detail={"loss_theirs": theirs["loss"], "loss_ours": ours["loss"]})


def score_all(env, case_name, device, label, model, sequences, tol):
    """Scores every sequence; records the model's own loss vs the recomputed one; returns {name: scores}."""
    out = {}
    for s in sequences:
        try:
            loss, loss2, nt = env.scores(model, s["ids"], device)
            out[s["name"]] = {"loss": loss, "next_token_logprobs": nt}
            if abs(loss - loss2) > 1e-5:
                record(case_name, device, label + "_loss_consistency", False, sequence=s["name"],
                       max_abs_diff=abs(loss - loss2), tol=1e-5)
        except Exception:
            record(case_name, device, label + "_forward", False, sequence=s["name"], error=error_text())
    return out


def loading_problems(info, model):
    """Missing/unexpected/mismatched weights reported by from_pretrained, or None (lm_head of a tied model is fine)."""
    if not info or not isinstance(info, dict):
        return None
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    probs = {}
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        v = [str(x) for x in (info.get(key) or [])]
        if key == "missing_keys" and tied:
            v = [x for x in v if x != "lm_head.weight"]
        if v:
            probs[key] = v
    return probs or None


def check_tokenizer(env, case, bundle):
    name = case["name"]
    tok_info = case.get("tokenizer")
    if not tok_info:
        return
    model_dir = os.path.join(bundle, case["model"])
    try:
        tok = env.transformers.AutoTokenizer.from_pretrained(model_dir)
        record(name, "-", "tokenizer_load", True, detail={"class": type(tok).__name__})
    except Exception:
        record(name, "-", "tokenizer_load", False, error=error_text())
        return
    for i, s in enumerate(tok_info.get("samples", [])):
        for flag, key in ((True, "ids_with_special"), (False, "ids_no_special")):
            try:
                ids = list(tok(s["text"], add_special_tokens=flag)["input_ids"])
                ok = ids == s[key]
                record(name, "-", "tokenizer_encode_" + key, ok, sequence="sample-%d" % i,
                       detail=None if ok else {"text": s["text"], "theirs": ids, "ours": s[key]})
            except Exception:
                record(name, "-", "tokenizer_encode_" + key, False, sequence="sample-%d" % i, error=error_text())
    chat = tok_info.get("chat")
    if chat:
        try:
            rendered = tok.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=False)
            ok = rendered == chat["rendered"]
            record(name, "-", "chat_template_render", ok,
                   detail=None if ok else {"theirs": rendered, "ours": chat["rendered"]})
            ids = list(tok(rendered, add_special_tokens=False)["input_ids"])
            ok = ids == chat["ids"]
            record(name, "-", "chat_encode", ok, detail=None if ok else {"theirs": ids, "ours": chat["ids"]})
        except Exception:
            record(name, "-", "chat_template", False, error=error_text())


def check_case(env, case, bundle, device, tol):
    name = case["name"]
    model_dir = os.path.join(bundle, case["model"])
    adapter_dir = os.path.join(bundle, case["adapter"]) if case.get("adapter") else None
    merged_dir = os.path.join(bundle, case["merged"]) if case.get("merged") else None
    seqs = case["sequences"]

    # Base model.
    try:
        base, info = env.load_model(model_dir, device)
        probs = loading_problems(info, base)
        record(name, device, "load_base", probs is None,
               detail={"class": type(base).__name__, "problems": probs})
    except Exception:
        record(name, device, "load_base", False, error=error_text())
        return
    base_scores = score_all(env, name, device, "base", base, seqs, tol)
    for s in seqs:
        if s["name"] in base_scores:
            compare(name, device, "base_vs_ours", s["name"], base_scores[s["name"]], s["base"], tol)
    del base

    if adapter_dir is None:
        return

    # PEFT with our adapter, then its merge.
    peft_merged = None
    try:
        base2, _ = env.load_model(model_dir, device)
        pm = env.peft.PeftModel.from_pretrained(base2, adapter_dir)
        pm = pm.to(device)
        pm.eval()
        n_lora = sum(1 for n, _ in pm.named_parameters() if "lora_A" in n or "lora_B" in n)
        n_file = len(read_safetensors_header(os.path.join(adapter_dir, "adapter_model.safetensors")))
        record(name, device, "peft_load", n_lora == n_file,
               detail={"lora_parameters_in_model": n_lora, "tensors_in_adapter_file": n_file})
        peft_scores = score_all(env, name, device, "peft", pm, seqs, tol)
        for s in seqs:
            if s["name"] in peft_scores:
                compare(name, device, "peft_vs_ours_adapter", s["name"], peft_scores[s["name"]], s["adapter"], tol)
        peft_merged = pm.merge_and_unload()
        peft_merged.eval()
        pmerge_scores = score_all(env, name, device, "peft_merge", peft_merged, seqs, tol)
        for s in seqs:
            if s["name"] in pmerge_scores:
                compare(name, device, "peft_merge_vs_ours_merged", s["name"], pmerge_scores[s["name"]], s["merged"], tol)
                compare(name, device, "peft_merge_vs_ours_adapter", s["name"], pmerge_scores[s["name"]], s["adapter"], tol)
    except Exception:
        record(name, device, "peft", False, error=error_text())
        pmerge_scores = {}

    if merged_dir is None:
        return

    # transformers loading our merged folder.
    try:
        ours_m, info = env.load_model(merged_dir, device)
        probs = loading_problems(info, ours_m)
        record(name, device, "load_our_merged", probs is None, detail={"problems": probs})
        om_scores = score_all(env, name, device, "our_merged", ours_m, seqs, tol)
        for s in seqs:
            if s["name"] not in om_scores:
                continue
            compare(name, device, "our_merged_folder_vs_ours_merged", s["name"], om_scores[s["name"]], s["merged"], tol)
            if s["name"] in pmerge_scores:
                compare(name, device, "our_merged_folder_vs_peft_merge", s["name"], om_scores[s["name"]], pmerge_scores[s["name"]], tol)
        if peft_merged is not None:
            a = {k: v.detach().float().cpu() for k, v in peft_merged.state_dict().items()}
            b = {k: v.detach().float().cpu() for k, v in ours_m.state_dict().items()}
            common = sorted(set(a) & set(b))
            worst, worst_name, shape_bad = 0.0, None, []
            for k in common:
                if tuple(a[k].shape) != tuple(b[k].shape):
                    shape_bad.append(k)
                    continue
                d = float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0
                if d > worst:
                    worst, worst_name = d, k
            wtol = 1e-5
            record(name, device, "merged_weights_vs_peft_merge", worst <= wtol and not shape_bad and bool(common),
                   max_abs_diff=worst, tol=wtol,
                   detail={"worst": worst_name, "compared": len(common), "shape_mismatch": shape_bad,
                           "only_in_peft": sorted(set(a) - set(b)), "only_in_ours": sorted(set(b) - set(a))})
    except Exception:
        record(name, device, "our_merged", False, error=error_text())


# ------------------------------------------------------------------------------------------------ main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?", default=".device/refcheck")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, or a comma list such as cpu,cuda")
    ap.add_argument("--out", default=None, help="folder for reference_check.json (default: $OUT, else the bundle)")
    ap.add_argument("--tol", type=float, default=None, help="log-prob tolerance (default: expected.json's, 1e-3)")
    args = ap.parse_args()

    bundle = os.path.abspath(args.bundle)
    out_dir = args.out or os.environ.get("OUT") or bundle
    os.makedirs(out_dir, exist_ok=True)
    out_file = os.path.join(out_dir, "reference_check.json")
    report = {"bundle": bundle, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "python": sys.version, "platform": platform.platform(), "checks": RESULTS}
    fatal = None
    try:
        with open(os.path.join(bundle, "expected.json")) as f:
            expected = json.load(f)
        tol = args.tol if args.tol is not None else float(expected.get("tolerance", 1e-3))
        report["tolerance"] = tol
        report["expected_engine"] = expected.get("engine")

        check_bnb4_layout(bundle, expected)

        env = Env()
        versions = {"torch": env.torch.__version__, "transformers": env.transformers.__version__,
                    "peft": env.peft.__version__, "cuda_available": bool(env.torch.cuda.is_available())}
        try:
            import bitsandbytes  # noqa: F401
            versions["bitsandbytes"] = bitsandbytes.__version__
        except Exception:
            versions["bitsandbytes"] = None
        if versions["cuda_available"]:
            versions["gpu"] = env.torch.cuda.get_device_name(0)
        report["versions"] = versions
        print("versions: %s" % json.dumps(versions), flush=True)

        devices = [d.strip() for d in args.device.split(",") if d.strip()]
        for case in expected["cases"]:
            check_tokenizer(env, case, bundle)
            for device in devices:
                if device.startswith("cuda") and not env.torch.cuda.is_available():
                    record(case["name"], device, "device_available", False, error="CUDA is not available")
                    continue
                try:
                    check_case(env, case, bundle, device, tol)
                except Exception:
                    record(case["name"], device, "case", False, error=error_text())
    except Exception:
        fatal = error_text()
        record("-", "-", "setup", False, error=fatal)
    finally:
        failed = [r for r in RESULTS if not r["passed"]]
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        report["summary"] = {"checks": len(RESULTS), "passed": len(RESULTS) - len(failed), "failed": len(failed),
                             "ok": not failed and bool(RESULTS)}
        worst = {}
        for r in RESULTS:
            if r["max_abs_diff"] is not None:
                key = "%s/%s/%s" % (r["case"], r["device"], r["check"])
                worst[key] = max(worst.get(key, 0.0), r["max_abs_diff"])
        report["summary"]["worst_by_check"] = worst
        with open(out_file, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print("\n== summary: %d checks, %d passed, %d failed -> %s" % (len(RESULTS), len(RESULTS) - len(failed), len(failed), out_file))
        for key in sorted(worst):
            print("   %-70s max|diff| %.3g" % (key, worst[key]))
        for r in failed:
            print("   FAILED %s/%s %s %s" % (r["case"], r["device"], r["check"], r["sequence"] or ""))
    return 0 if report["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
