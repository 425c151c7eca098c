"""Print what the GPU machine offers that arvid's backends care about (torch, attention impls)."""

import inspect
import json

import torch


def main() -> None:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        import torch.nn.attention.varlen as v

        info["varlen_attn_signature"] = str(inspect.signature(v.varlen_attn))
    except Exception as e:  # report, do not fail: this is a probe
        info["varlen_attn_signature"] = f"unavailable: {e!r}"
    try:
        import torch.nn.attention as a

        info["flash_impls"] = list(a.list_flash_attention_impls())
        for impl in info["flash_impls"]:
            try:
                a.activate_flash_attention_impl(impl)
                info[f"activate_{impl}"] = "ok"
                a.restore_flash_attention_impl()
            except Exception as e:
                info[f"activate_{impl}"] = repr(e)[:300]
    except Exception as e:
        info["flash_impls"] = repr(e)
    for mod in ("flash_attn", "xformers", "av", "triton"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "present")
        except Exception as e:
            info[mod] = f"missing: {type(e).__name__}"
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
