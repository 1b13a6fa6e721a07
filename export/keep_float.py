"""--keep-float and --explain, per backend asked for: the sensitivity table written (and its plot), the layers to
keep float chosen (export/selective.py does the measuring, TensorFlow's side), and the mixed files made."""

from __future__ import annotations

from pathlib import Path

from export.make import metadata
from export.onnx_source import node_selective
from runtime.errors import EdgeKitError, suggest
from runtime.fsutil import atomic_write_json
from runtime.text import terminal
from runtime.vocabulary import MIXED_OF, get_format


def selective_formats(src, fmts, out, calibration, keep_float, explain, budget, progress, onnx_proto, method):
    """--explain and --keep-float (export/selective.py), per backend asked for: write the sensitivity table, and
    return the formats to make and {mixed format: (bytes, record), or None when nothing meets the budget}."""
    from export import selective as sel

    x_val, y_val = src.dataset.arrays("val")
    x_test, y_test = src.dataset.arrays("test")
    keys = [f.key for f in fmts]
    mixed = {}
    if keep_float not in (None, "auto"):  # names checked before the calibration they would waste
        known = ([n.name for n in src.model.proto.graph.node if n.name] if src.kind == "onnx" else
                 [layer.name for layer in sel.all_layers(src.model)])
        for name in keep_float:
            if name not in known:
                raise EdgeKitError(terminal(f"--keep-float: {src.path.name} has no "
                                            f"{'node' if src.kind == 'onnx' else 'layer'} named '{name}'."
                                            f"{suggest(name, known)}"))
    for plain, mixed_key in MIXED_OF.items():
        if plain not in keys and mixed_key not in keys:
            continue
        progress(f"{plain}: calibrating once for selective quantization ...")
        if src.kind == "onnx":
            chooser = node_selective(src.model, onnx_proto, calibration, method, metadata(src))
        else:
            chooser = (sel.Selective(src.model, calibration) if plain == "int8" else
                       sel.ONNXSelective(src.model, onnx_proto, calibration, method, metadata(src)))
        if keep_float not in (None, "auto"):
            chooser.check_names(keep_float)
        table = None
        if keep_float == "auto" and not explain:  # plain int8 first: the sweep only when it misses the budget
            float_val, int8_val, _ = sel.plain_int8(chooser, x_val, y_val)
            if int8_val >= float_val - budget / 100 - 1e-9:
                progress(f"{plain}: full int8 is within the {budget:g}-point budget on the validation split "
                         f"({int8_val:.2%} vs float {float_val:.2%}); written as {plain}, no layer kept float")
                keys = [k for k in keys if k != mixed_key] + ([] if plain in keys else [plain])
                continue
        if explain or keep_float == "auto":
            table = sel.explain(chooser, x_val, y_val, x_test, y_test, calibration, progress)
            if explain:
                write_sensitivity(out, table, progress)
        if keep_float is None:
            continue
        if keep_float == "auto":
            kept = sel.choose(chooser, table, x_val, y_val, budget)
            if kept == []:
                progress(f"{plain}: full int8 is within the {budget:g}-point budget on the validation split "
                         f"({table['int8_val_accuracy']:.2%} vs float {table['float_val_accuracy']:.2%}); "
                         f"written as {plain}")
                keys = [k for k in keys if k != mixed_key] + ([] if plain in keys else [plain])
                continue
            how = "auto: the most sensitive keep sets, greedily, until the validation accuracy is within the budget"
        else:
            kept, how = list(keep_float), "by name (--keep-float)"
        keys = list(dict.fromkeys(mixed_key if k == plain else k for k in [*keys, mixed_key]))
        if kept is None:
            progress(f"{mixed_key}: even with every layer float the validation accuracy misses the "
                     f"{budget:g}-point budget")
            mixed[mixed_key] = None
            continue
        data = chooser.quantize(kept)
        record = kept_record(chooser, kept, how, table, data, x_val, y_val)
        progress(terminal(f"{mixed_key}: keeping {', '.join(kept)} float ({how}); validation accuracy "
                 f"{record['val_accuracy']:.2%} against full int8's {record['int8_val_accuracy']:.2%}"))
        mixed[mixed_key] = (data, record)
    return [get_format(k) for k in keys], mixed


def kept_record(chooser, kept, how, table, data, x_val, y_val) -> dict:
    """What the sidecar and the manifest say of an int8-mixed file: the layers kept float and what each cost."""
    from export.selective import accuracy_of, timed_ratio

    full = chooser.quantize()
    full_val = table["int8_val_accuracy"] if table else accuracy_of(full, x_val, y_val, chooser.suffix)
    per_layer = []
    for name in kept:
        alone = chooser.quantize([name])
        entry = (table or {}).get("layers") and next((e for e in table["layers"] if e["name"] == name), None)
        per_layer.append({"layer": name, "kind": chooser.layers[name].kind,
                          "size_cost_bytes": len(alone) - len(full),
                          "val_gain_points_of_its_keep_set": entry["gain_points"] if entry else None,
                          "sqnr_db_in_full_int8": entry["sqnr_db"] if entry else None})
    return {"layers": list(kept), "chosen": how, "validation_images": int(len(y_val)),
            "int8_val_accuracy": full_val, "val_accuracy": accuracy_of(data, x_val, y_val, chooser.suffix),
            "size_cost_bytes": len(data) - len(full), "int8_size_bytes": len(full),
            "latency_ratio_vs_int8": timed_ratio(data, full, x_val[:1], chooser.suffix), "per_layer": per_layer}


def write_sensitivity(out: Path, table: dict, progress) -> None:
    """sensitivity.<format>.json, sensitivity.<format>.png and the table on the console."""
    from export.selective import plot_sensitivity

    name = f"sensitivity.{table['format']}"
    atomic_write_json(out / f"{name}.json", table)
    drawn = plot_sensitivity(table, out / f"{name}.png")
    progress(f"{table['format']} sensitivity: float {table['float_val_accuracy']:.2%}, full int8 {table['int8_val_accuracy']:.2%} "
             f"on {table['validation_images']} validation images (full int8 on the test split: "
             f"{table['int8_test_accuracy']:.2%})")
    progress(f"  {'layer':<28} {'kind':<22} {'SQNR dB med/worst':>17} {'val, kept float':>15} {'gain':>7} "
             f"{'test':>7}  keep set")
    for row in table["layers"]:
        sqnr = ("-" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f}/{row['worst_channel_db']:.1f}")
        test = "-" if row["test_accuracy"] is None else f"{row['test_accuracy']:.2%}"
        progress(terminal(f"  {row['name'][:28]:<28} {row['kind'][:22]:<22} {sqnr:>17} {row['val_accuracy']:>15.2%} "
                          f"{row['gain_points']:>+7.2f} {test:>7}  {', '.join(row['keep'])}"))
    if not drawn:
        progress(f"  {table['format']} loses nothing here: no layer kept float gains validation accuracy, so there "
                 "is no plot")
    progress(f"  wrote {out / (name + '.json')}" + (f" and {out / (name + '.png')}" if drawn else ""))
