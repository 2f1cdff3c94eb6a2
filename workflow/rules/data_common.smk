# Settings and argument strings of the data rules (data.smk); no rules here.
DATA_CFG = config["data"]
SHARDS = DATA_CFG.get("shards")
PARTS = DATA_CFG.get("parts") or SHARDS
WORK = f"{DATA}.work"


def data_source_args():
    """The source and split options every sharded step reads the corpus with."""
    d = DATA_CFG
    args = [f"--source {d['source']}", f"--val-fraction {d['val_fraction']}"]
    if d["source"] == "files":
        args += [f"--files {g!r}" for g in d["files"]]
    if d["source"] == "hf":
        args += [
            f"--hf {d['hf']['name']}",
            f"--hf-split {d['hf'].get('split', 'train')}",
            f"--hf-text-field {d['hf'].get('text_field', 'text')}",
        ]
        if d["hf"].get("config"):
            args += [f"--hf-config {d['hf']['config']}"]
    if d.get("cache"):
        args += [f"--cache {d['cache']}"]
    return " ".join(args)


def data_tokenizer_args():
    d = DATA_CFG
    if d.get("tokenizer"):
        return f"--tokenizer {d['tokenizer']}"
    sample = d.get("tokenizer_sample") or {}
    args = [f"--vocab-size {d['vocab_size']}"]
    if sample.get("docs"):
        args += [f"--sample-docs {sample['docs']}"]
    if sample.get("bytes"):
        args += [f"--sample-bytes {sample['bytes']}"]
    return " ".join(args)


def data_resources(step, key, default):
    return (DATA_CFG.get("resources") or {}).get(step, {}).get(key, default)


def shard_names():
    return ["val"] + [f"{i:05d}" for i in range(SHARDS)]
