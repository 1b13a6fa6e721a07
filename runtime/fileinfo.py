"""`python -m runtime info FILE`: what a bare .tflite or .onnx file is, before anything else is done with it.

Every input and output (name, shape, dtype, layout, quantization), the opset and producer, the operator census,
size and sha256, packed labels, and whether EdgeKit can treat the file as an image classifier (and if not, why).
Read through the backends themselves (LiteRT, onnxruntime) and the file's own bytes, never TensorFlow or onnx.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np

from runtime.artifacts.manifest import MANIFEST, needs_edgekit, read_manifest, sidecar_path, verify_files
from runtime.backends import tflm
from runtime.backends.onnx import session as onnx_session
from runtime.backends.onnx_proto import ONNX_DTYPES, onnx_summary
from runtime.backends.sparse import interpreter as open_interpreter, sparse_file
from runtime.errors import ArtifactError, EdgeKitError, first_line
from runtime.fsutil import check_readable_file, sha256_file
from runtime.limits import json_loads
from runtime.load import BACKENDS, input_layout, load, packed_labels
from runtime.text import terminal


def _layout(shape: list) -> str | None:
    """A 4-d input's layout read from its shape, "ambiguous", or None for other ranks."""

    if len(shape) != 4:
        return None
    try:
        return input_layout(tuple(None if d is None or d < 0 else d for d in shape), None, None, "")
    except EdgeKitError:
        return "ambiguous"


def tflite_description(data: bytes) -> str:
    """The `description` string of a TFLite flatbuffer (Model table, field 3: "MLIR Converted." from the TFLite
    converter), read with every offset checked; '' when absent or unreadable."""
    try:
        root = struct.unpack_from("<I", data, 0)[0]
        vtable = root - struct.unpack_from("<i", data, root)[0]
        vtable_size = struct.unpack_from("<H", data, vtable)[0]
        if vtable_size < 4 + 2 * 4:
            return ""
        offset = struct.unpack_from("<H", data, vtable + 4 + 2 * 3)[0]
        if not offset:
            return ""
        at = root + offset
        start = at + struct.unpack_from("<I", data, at)[0]
        length = struct.unpack_from("<I", data, start)[0]
        if length > 4096 or start + 4 + length > len(data):
            return ""
        return data[start + 4:start + 4 + length].decode("utf-8", "replace")
    except (struct.error, IndexError):
        return ""


def _tflite(path: Path) -> dict:
    try:
        interpreter = open_interpreter(path)
        ops = interpreter._get_ops_details()  # LiteRT has no public per-op listing
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    except (ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path} is not a valid TFLite model ({first_line(exc)}).") from exc

    def tensor(detail) -> dict:
        shape = [int(d) for d in detail.get("shape_signature", detail["shape"])]
        quantization = detail.get("quantization_parameters") or {}
        scales = [float(v) for v in np.asarray(quantization.get("scales", [])).ravel()]
        zeros = [int(v) for v in np.asarray(quantization.get("zero_points", [])).ravel()]
        return {"name": detail["name"], "shape": shape, "dtype": np.dtype(detail["dtype"]).name,
                "layout": _layout(shape), "scale": scales[0] if len(scales) == 1 else (scales or None),
                "zero_point": zeros[0] if len(zeros) == 1 else (zeros or None)}

    with open(path, "rb") as fh:
        head = fh.read(min(path.stat().st_size, 64 << 20))
    return {"inputs": [tensor(d) for d in inputs], "outputs": [tensor(d) for d in outputs],
            "ops": dict(Counter(op["op_name"] for op in ops if op["op_name"] != "DELEGATE")),
            "producer": tflite_description(head) or None, "opset": None, "sparse_tensors": sparse_file(path)}


def _micro_figures(path: Path) -> dict:
    """MACs per inference, and where TensorFlow Lite Micro could run the file, its tensor arena as TFLM measures
    it (tflite-micro installed) or why not."""

    data = path.read_bytes()
    out = {}
    try:
        out["macs"] = tflm.macs(data)
    except Exception:  # a file LiteRT opened but whose tables this reader cannot walk: no figure, no failure
        out["macs"] = None
    missing = tflm.unsupported(tflm.operators(data))
    if missing:
        out["micro"] = {"arena_bytes": None, "reason": f"uses {', '.join(missing)}, which TensorFlow Lite Micro has "
                                                       "no kernel for"}
    elif importlib.util.find_spec("tflite_micro") is None:
        out["micro"] = {"arena_bytes": None, "reason": f"TFLM's arena not measured: {tflm.EXTRA}"}
    else:
        try:
            out["micro"] = {"arena_bytes": tflm.arena_bytes(path), "reason": None}
        except EdgeKitError as exc:
            out["micro"] = {"arena_bytes": None, "reason": str(exc)}
    return out


def _onnx(path: Path) -> dict:
    session = onnx_session(path)  # its external data checked first
    try:
        summary = onnx_summary(path.read_bytes())
    except ValueError as exc:
        raise ArtifactError(f"{path} is not a valid ONNX model ({exc}).") from exc

    def tensor(node) -> dict:
        shape = [d if isinstance(d, int) and d > 0 else -1 for d in node.shape]
        named = {str(i): d for i, d in enumerate(node.shape) if isinstance(d, str)}  # symbolic dims: batch, ...
        return {"name": node.name, "shape": shape, "dtype": ONNX_DTYPES.get(node.type, node.type),
                "layout": _layout(shape), "scale": None, "zero_point": None, **({"dims": named} if named else {})}

    producer = " ".join(v for v in (summary["producer"], summary["producer_version"]) if v) or None
    quantized = sum(n for op, n in summary["ops"].items() if op in ("QuantizeLinear", "DequantizeLinear",
                                                                     "QLinearConv", "QLinearMatMul"))
    return {"inputs": [tensor(n) for n in session.get_inputs()], "outputs": [tensor(n) for n in session.get_outputs()],
            "ops": summary["ops"], "producer": producer, "opset": summary["opsets"].get("ai.onnx"),
            "opsets": summary["opsets"], "ir_version": summary["ir_version"], "quantize_nodes": quantized,
            "external_data": [{"file": name, "bytes": (path.parent / name).stat().st_size}
                              for name in summary["external_data"]]}  # onnxruntime read them: they are there


def describe(path: str | Path) -> dict:
    """Everything `info FILE` shows, as a dict (`--json`)."""

    path = Path(path)
    fmt = BACKENDS.get(path.suffix.lower())
    if fmt is None:
        raise EdgeKitError(f"{path}: expected a .tflite or .onnx file, or an artifact directory; got "
                           f"'{path.suffix or 'no suffix'}'.")
    size = check_readable_file(path, "model file").st_size
    if size == 0:
        raise ArtifactError(f"model file {path} is empty.")
    info = {"path": str(path), "format": fmt, "size_bytes": size, "sha256": sha256_file(path),
            **(_tflite(path) if fmt == "tflite" else _onnx(path))}
    info["labels"] = packed_labels(path, None) if fmt == "tflite" else None
    if fmt == "tflite":
        info.update(_micro_figures(path))

    info["sidecar"] = sidecar_path(path).name if sidecar_path(path).is_file() else None
    try:
        model = load(path)
        bare = (model.sidecar or {}).get("bare")
        info["made_from"] = _made_from(model.sidecar or {})
        info["deploy"] = {"needs_edgekit": needs_edgekit(model.sidecar),
                          "verified_in": bare["runtime"] if isinstance(bare, dict) and bare.get("passed") else None}
        info["classifier"] = {"image_classifier": True, "layout": model.layout, "image": list(model.input_shape),
                              "classes": model.num_classes, "output": model.output_kind,
                              "preprocessing": model.preprocessing_source,
                              "reason": None if model.preprocessing is not None else
                              "float input without a sidecar: pass --mean and --std to give it images"}
    except EdgeKitError as exc:
        info["classifier"] = {"image_classifier": False, "reason": str(exc).replace(f"{path}: ", "")
                              .replace(f"{path} ", "")}
    return info


def _made_from(sidecar: dict) -> dict | None:
    """What a sidecar says the file was made from (its source's kind and producer) and by which tools (the
    converter, then the quantizer: litert-torch then ai-edge-quantizer for a .pt2 program's dynamic file)."""
    source = sidecar.get("source") if isinstance(sidecar.get("source"), dict) else {}
    tools = [sidecar[k] for k in ("converted_by", "quantized_by") if isinstance(sidecar.get(k), dict)]
    named = [" ".join(str(tool[k]) for k in ("tool", "version") if tool.get(k)) for tool in tools]
    made = {"kind": source.get("kind"), "producer": source.get("producer"),
            "tool": " and ".join(dict.fromkeys(n for n in named if n)) or None}
    return {k: v if isinstance(v, str) else None for k, v in made.items()} if any(made.values()) else None


def _tensor_line(t: dict) -> str:
    shape = "[" + ", ".join("?" if d < 0 else str(d) for d in t["shape"]) + "]"
    quant = ""
    if t.get("scale") is not None:
        scale = t["scale"] if not isinstance(t["scale"], list) else f"{len(t['scale'])} per-channel scales"
        quant = f"  scale {scale:.6g} zero point {t['zero_point']}" if isinstance(scale, float) else f"  {scale}"
    layout = f"  {t['layout'].upper()}" if t.get("layout") else ""
    return f"{terminal(t['name'])}  {shape} {t['dtype']}{layout}{quant}"


def show(info: dict) -> None:
    """`info FILE`'s text."""

    kind = {"tflite": "TFLite", "onnx": "ONNX"}[info["format"]]
    print(f"{terminal(info['path'])}: {kind} file, {info['size_bytes']:,} bytes, sha256 {info['sha256']}")
    if info.get("sidecar"):
        print(f"sidecar      {terminal(info['sidecar'])} (labels, preprocessing and verification from EdgeKit's export)")
    if info.get("producer"):
        print(f"producer     {terminal(info['producer'])}")
    made = info.get("made_from") or {}
    if made.get("producer") or made.get("tool"):
        print(f"made from    {terminal(made.get('producer') or made.get('kind') or 'its source')}"
              + (f", by {terminal(made['tool'])}" if made.get("tool") else ""))
    if info.get("opset") is not None:
        used = {op.rsplit(".", 1)[0] for op in info["ops"] if "." in op}  # the other domains the graph's ops use
        others = ", ".join(f"{d} {v}" for d, v in info.get("opsets", {}).items() if d in used)
        print(f"opset        {info['opset']}" + (f" (and {others})" if others else "")
              + (f", IR version {info['ir_version']}" if info.get("ir_version") else ""))
    if info.get("sparse_tensors"):
        print(f"sparse       {info['sparse_tensors']} weight tensors stored sparse (the converter's sparse encoding); "
              "densified in memory when EdgeKit's runtime loads the file, so it runs as the dense file does")
    deploy = info.get("deploy") or {}
    if deploy.get("needs_edgekit") or (info.get("sparse_tensors") and not deploy.get("verified_in")):
        print(f"deploy       needs EdgeKit's runtime on the device: "
              f"{terminal(deploy.get('needs_edgekit') or 'bare LiteRT XNNPACK refuses sparse int8 and dynamic files')}")
    elif deploy.get("verified_in"):
        print(f"deploy       verified at export in {terminal(deploy['verified_in'])}, as the user's own app runs it")
    for data in info.get("external_data") or []:
        print(f"weights in   {terminal(data['file'])} ({data['bytes']:,} bytes, external data beside the file)")
    for kind in ("inputs", "outputs"):
        print(f"{kind}:")
        for t in info[kind]:
            print(f"  {_tensor_line(t)}")
    ops = sorted(info["ops"].items(), key=lambda kv: (-kv[1], kv[0]))
    print(f"operators    {sum(info['ops'].values())} in all: " + ", ".join(f"{terminal(k)} {v}" for k, v in ops))
    if info.get("macs"):
        print(f"MACs         {info['macs']:,} per inference (convolutions, fully connected layers)")
    record = info.get("micro")
    if record:
        print(f"micro        TFLM's tensor arena {record['arena_bytes']:,} bytes (measured here; a 32-bit core's is "
              f"slightly smaller), flash {info['size_bytes']:,} bytes (the file)" if record["arena_bytes"] else
              f"micro        {terminal(record['reason'])}")
    labels = info.get("labels")
    if labels:
        shown = ", ".join(map(terminal, labels[:8])) + (", ..." if len(labels) > 8 else "")
        print(f"labels       {len(labels)} packed in the file: {shown}")
    c = info["classifier"]
    if c["image_classifier"]:
        h, w, ch = c["image"]
        line = (f"classifier   yes: {h}x{w}x{ch} images ({c['layout'].upper()}), {c['classes']} classes "
                f"({c['output']})")
        print(line + (f"; {c['reason']}" if c.get("reason") else ""))
    else:
        print(f"classifier   no: {terminal(c['reason'])}")


def number_or_dash(value, spec: str, unit: str = "") -> str:
    return format(value, spec) + unit if type(value) in (int, float) else "-"


def info_command(args) -> int:
    directory = Path(args.artifact)
    if directory.suffix.lower() in (".tflite", ".onnx") and not directory.is_dir():
        info = describe(directory)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            show(info)
        return 0
    if (directory / "pipeline.json").is_file() and not (directory / MANIFEST).exists():
        return run_directory_info(directory, args.json)
    manifest = read_manifest(args.artifact)
    problems = verify_files(args.artifact, manifest)
    if args.json:
        print(json.dumps({"manifest": manifest, "intact": not problems, "problems": problems}, indent=2))
    else:
        metrics = manifest["metrics"]
        parent = manifest.get("parent") or {}
        lines = [
            ("name", manifest["name"]),
            ("kind", manifest["kind"]),
            ("model", manifest["model"]),
            ("dataset", manifest["dataset"].get("name") if isinstance(manifest["dataset"], dict)
             else manifest["dataset"]),
            ("parent", "-" if not parent else
             f"{parent.get('name') or parent.get('path')} ({parent.get('kind', '?')}, test accuracy "
             f"{number_or_dash(parent.get('accuracy'), '.2%')}, model sha256 {parent.get('model_sha256', '-')})"),
        ]
        if manifest.get("recipe"):
            lines.append(("recipe", recipe_text(manifest["recipe"])))
        if len(manifest.get("lineage") or []) > 1:
            lines.append(("lineage", " -> ".join(step.get("technique", "?") for step in manifest["lineage"])))
        lines += [
            ("created", manifest["created"]),
            ("input shape", "x".join(str(v) for v in manifest["input_shape"])),
            ("labels", ", ".join(map(terminal, manifest["labels"]))),
            ("test accuracy", number_or_dash(metrics.get("accuracy"), ".2%")),
            ("model size", number_or_dash(metrics.get("size_bytes"), ",", " bytes")
             + (" (the float model; its int8 export is the file to ship)" if metrics.get("qat_weights_bytes") else "")),
        ]
        if "params" in metrics:
            lines.append(("parameters", number_or_dash(metrics["params"], ",")))
        exports = manifest.get("exports", {})
        if exports:
            lines.append(("exports", ", ".join(f"{key} {'verified' if e.get('passed') else 'FAILED'}"
                                               for key, e in exports.items())))
        lines.append(("checksums", "all match" if not problems else "; ".join(problems)))
        width = max(len(k) for k, _ in lines)
        for key, value in lines:
            print(f"{key:<{width}}  {value}")
        print("files:")
        names = sorted(manifest["files"])
        name_width = max((len(n) for n in names), default=0)
        for name in names:
            record = manifest["files"][name]
            print(f"  {name:<{name_width}}  {number_or_dash(record.get('bytes'), ',', ' bytes'):>16}  "
                  f"sha256 {record.get('sha256', '-')}")
    if problems:
        raise ArtifactError(f"{args.artifact} is damaged: {'; '.join(problems)}. Re-create it with the stage that "
                            "wrote it.")
    return 0


def recipe_text(recipe: dict) -> str:
    """'prune: sparsity 0.8; 2 epochs, lr 0.0003, batch 32, seed 0'."""
    training = ("epochs", "lr", "batch_size", "seed", "exclude")
    own = [f"{k.replace('_', ' ')} {v}" for k, v in recipe.items()
           if k != "technique" and k not in training and v not in (None, [], {})]
    tuning = [f"{recipe['epochs']} epochs" if "epochs" in recipe else None,
              f"lr {recipe['lr']:g}" if "lr" in recipe else None,
              f"batch {recipe['batch_size']}" if "batch_size" in recipe else None,
              f"seed {recipe['seed']}" if "seed" in recipe else None,
              f"exclude {', '.join(recipe['exclude'])}" if recipe.get("exclude") else None]
    return f"{recipe.get('technique', '?')}: " + "; ".join(
        part for part in (", ".join(own), ", ".join(t for t in tuning if t)) if part)


def run_directory_info(directory, as_json: bool) -> int:
    """A pipeline's run directory: its plan, stages, artifacts and the report's recommendation."""

    try:
        status = json_loads((directory / "pipeline.json").read_text("utf-8"))
        plan, stages = status["plan"], status.get("stages", {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{directory}/pipeline.json is damaged ({exc}); rerun `python -m pipeline`.") from None
    artifacts = sorted(p.name for p in directory.iterdir() if (p / MANIFEST).is_file())
    report = None
    try:
        report = json_loads((directory / "report.json").read_text("utf-8"))
    except (OSError, ValueError):
        pass
    if as_json:
        print(json.dumps({"run_directory": str(directory), "plan": plan, "stages": stages, "artifacts": artifacts,
                          "report": report}, indent=2))
        return 0
    print(f"{directory} is a pipeline run directory ({plan.get('model')} on {plan.get('dataset')}), "
          f"not an artifact: {len(artifacts)} artifacts ({', '.join(artifacts) or 'none'}).")
    failed = [name for name, s in stages.items() if isinstance(s, dict) and s.get("status") == "failed"]
    print("stages: " + (f"{len(failed)} failed ({', '.join(failed)})" if failed else "none failed"))
    if report and report.get("summary"):
        print(f"report: {directory / 'report.md'}; to ship, within the {report.get('budget_points', 1):g}-point "
              "budget:")
        for line in report["summary"]:
            print(f"  {line}")
    else:
        print(f"no report yet: python -m runtime report {directory}")
    print(f"one artifact: python -m runtime info {directory / (artifacts[0] if artifacts else '<artifact>')}")
    return 0
