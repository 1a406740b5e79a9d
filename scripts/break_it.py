#!/usr/bin/env python3
"""Break one behaviour at a time, in a copy of the repository, and run the tests against it: every break must turn
the tests red. Prints, per break, the tests that failed (those that also fail without any break are left out).

Not a test and not run by CI (pytest collects tests/ only): each break is a test run of its own. By default a break
runs the test files that cover its area; --full runs the whole suite for every break.

    python scripts/break_it.py                        # every break
    python scripts/break_it.py --list                 # what each break changes
    python scripts/break_it.py stop-tokens-emptied    # some breaks
    python scripts/break_it.py --full warmup-zero     # the whole suite

The checkout itself is never modified; each break edits a fresh copy under a temporary directory, found by exact
text: a break whose text no longer occurs exactly once stops the script, so the list has to follow the code.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_ANYWHERE = shutil.ignore_patterns(".git", ".venv", ".toolkit-cache", "__pycache__", "*.egg-info",
                                         ".pytest_cache", ".hypothesis")


def IGNORED(folder: str, names: list[str]) -> set[str]:
    """What the copy leaves out: caches and environments anywhere, training output (`runs/`) at the top only
    (`toolkit/runs/` is a package)."""
    skipped = set(SKIPPED_ANYWHERE(folder, names))
    if Path(folder) == ROOT and "runs" in names:
        skipped.add("runs")
    return skipped


@dataclass(frozen=True)
class Break:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


BREAKS = [
    Break("quantization-off", "to_bnb_config returns None: 8-bit/4-bit recipes train unquantized",
          "toolkit/config/quantization.py", '    """BitsAndBytesConfig for 8-bit/4-bit, None for no quantization."""\n',
          '    """BitsAndBytesConfig for 8-bit/4-bit, None for no quantization."""\n    return None\n',
          ("tests/test_sft.py", "tests/test_translate.py")),
    Break("skip-modules-ignored", "quantization.skip_modules is not passed to bitsandbytes",
          "toolkit/config/quantization.py", "    skip = list(quantization.skip_modules) if quantization.skip_modules else None\n",
          "    skip = None\n", ("tests/test_sft.py",)),
    Break("resume-ignored", "--resume trains from scratch (the checkpoint path passed as None)",
          "toolkit/training/trainer.py", "resume_from_checkpoint=str(resume_from) if resume_from else None",
          "resume_from_checkpoint=None", ("tests/test_sft.py",)),
    Break("compare-base-adapter-on", "eval --compare-base generates the base answers with the adapter on",
          "toolkit/evaluation/run_eval.py", "        with model.disable_adapter():\n", "        if True:\n",
          ("tests/test_eval.py",)),
    Break("grouping-off", "group_by_length leaves the rows in their given order",
          "toolkit/training/fit.py", "    if not settings.group_by_length:\n", "    if True:\n",
          ("tests/test_sft.py",)),
    Break("grouping-full-sort", "the 8-batch window replaced by one sort over the whole stream",
          "toolkit/data/batching.py", "    window = batch_size * window_batches\n", "    window = max(len(stream), 1)\n",
          ("tests/test_batching.py", "tests/test_sft.py")),
    Break("grouped-rows-shuffled", "the Trainer shuffles the grouped rows again (no sequential sampling)",
          "toolkit/config/translate.py", '        kwargs["train_sampling_strategy"] = "sequential"\n',
          '        kwargs["train_sampling_strategy"] = "random"\n', ("tests/test_sft.py", "tests/test_translate.py")),
    Break("warmup-zero", "warmup never reaches the SFTConfig",
          "toolkit/config/translate.py", "        warmup_steps=train.warmup_ratio,", "        warmup_steps=0,",
          ("tests/test_translate.py",)),
    Break("stop-tokens-emptied", "generation has no stop tokens (<|eot_id|> does not end an answer)",
          "toolkit/evaluation/generation.py", '    configured = getattr(model.generation_config, "eos_token_id", None)\n',
          '    return []\n', ("tests/test_generate.py",)),
    Break("fp32-master-weights-off", "bf16/fp16 training keeps the adapters in the base dtype",
          "toolkit/model/lora.py", '    if precision not in ("bf16", "fp16") or strategy == "zero3":\n', "    if True:\n",
          ("tests/test_lora.py",)),
    Break("lora-inputs-upcast", "LoRA gets fp32 copies of its inputs under bf16 (PEFT's casting left on)",
          "toolkit/model/lora.py", "active=mixed and not upcast_inputs", "active=False", ("tests/test_lora.py",)),
    Break("lock-off", "any number of processes write one run directory",
          "toolkit/io/files.py", "    path = folder / LOCK\n    key = str(path.resolve())\n",
          "    return folder / LOCK\n    key = None\n", ("tests/test_locking.py",)),
    Break("lock-file-blocks-forever", "a lock file left by a killed process is never taken over",
          "toolkit/io/files.py", "os.O_CREAT | os.O_RDWR, 0o644", "os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644",
          ("tests/test_locking.py",)),
    Break("overwrite-anything", "--overwrite empties any directory, the toolkit's or not",
          "toolkit/io/files.py", "    why = protected(folder)\n", "    return\n    why = protected(folder)\n",
          ("tests/test_run_safety.py",)),
    Break("diverged-run-saved", "a run whose loss or weights went NaN is saved as finished",
          "toolkit/training/fit.py", "    if guard.problem:\n", "    if False:\n", ("tests/test_run_safety.py",)),
    Break("extract-overwrites", "extract --output replaces an existing file without --overwrite",
          "toolkit/export/extraction.py", "        if not overwrite:\n", "        if False:\n",
          ("tests/test_extract.py",)),
    Break("special-tokens-from-data", "special-token text in a row becomes the special token",
          "toolkit/data/encode.py", "backend.encode_special_tokens = True", "backend.encode_special_tokens = False",
          ("tests/test_chat_format.py", "tests/test_properties.py")),
    Break("special-tokens-from-a-prompt", "special-token text in a prompt (eval, generate) becomes the special token",
          "toolkit/data/encode.py", "split_special_tokens=as_text", "split_special_tokens=False",
          ("tests/test_chat_format.py",)),
    Break("errors-as-markup", "error messages are printed as rich markup",
          "toolkit/cli.py", 'console.print(Text.assemble((label, "bold red"), " ", visible(message)), soft_wrap=True)',
          'console.print(f"[bold red]{label}[/] {message}", soft_wrap=True)', ("tests/test_cli_errors.py",)),
    Break("debug-ignored", "--debug shows no traceback",
          "toolkit/cli.py", "    if debug:\n        traceback.print_exc()\n",
          "    if False:\n        traceback.print_exc()\n", ("tests/test_cli_errors.py",)),
    Break("json-directory-unchecked", "eval --json DIR is found out only after generating",
          "toolkit/evaluation/run_eval.py", "    if json_path.is_dir():\n", "    if False:\n", ("tests/test_cli_errors.py",)),
    Break("read-only-run-unchecked", "--resume checks the folder around a run, not the run directory itself",
          "toolkit/runs/rundir.py", "    where = run_dir.resolve()\n", "    where = run_dir.resolve().parent\n",
          ("tests/test_cli_errors.py",)),
    Break("set-recursion", "a deeply nested --set value ends in a RecursionError",
          "toolkit/config/recipe.py", "    except RecursionError:\n        raise ToolkitError(f\"--set",
          "    except ZeroDivisionError:\n        raise ToolkitError(f\"--set", ("tests/test_recipe.py",)),
    Break("infinite-settings", "recipes accept .inf and .nan",
          "toolkit/config/recipe.py", "frozen=True, allow_inf_nan=False)", "frozen=True, allow_inf_nan=True)",
          ("tests/test_recipe.py",)),
    Break("skip-modules-unchecked", "quantization.skip_modules entries that match no layer pass validate",
          "toolkit/config/quantization.py", "    if unmatched:\n", "    if False:\n", ("tests/test_sft.py",)),
    Break("damaged-checkpoint-used", "--resume picks a checkpoint whose optimizer or scheduler file is damaged",
          "toolkit/runs/rundir.py", "or damaged_archive(folder)", "or None", ("tests/test_sft.py",)),
    Break("disk-full-unexplained", "a checkpoint that fills the disk ends in torch's own error",
          "toolkit/runs/rundir.py", "        full = isinstance(err, Exception) and", "        full = False and",
          ("tests/test_sft.py", "tests/test_cli_errors.py")),
    Break("damaged-run-files-unexplained", "a damaged tokenizer or adapter config ends in a library's error",
          "toolkit/runs/rundir.py", "    except (ValueError, KeyError, RuntimeError) as err:\n        if \"out of memory\"",
          "    except ZeroDivisionError as err:\n        if \"out of memory\"", ("tests/test_run_safety.py",)),
    Break("extract-clobbers-a-new-file", "a file created meanwhile at extract's --output is replaced",
          "toolkit/io/files.py", "        if replace:\n            os.replace(temporary, path)\n",
          "        if True:\n            os.replace(temporary, path)\n", ("tests/test_cli_errors.py",)),
    Break("merge-clobbers-a-new-folder", "a folder filled meanwhile at merge's --output is replaced",
          "toolkit/export/merging.py", "    if files.entries(out) and not overwrite:\n", "    if False:\n",
          ("tests/test_merge.py",)),
    Break("private-results", "results are left with the temporary file's private permissions (0600)",
          "toolkit/io/files.py", "    return (0o777 if directory else 0o666) & ~mask\n", "    return 0o600\n",
          ("tests/test_cli_errors.py",)),
    Break("eval-json-replaces-any-file", "eval --json overwrites a user's file",
          "toolkit/evaluation/run_eval.py", "    if json_path.exists():\n", "    if False:\n", ("tests/test_cli_errors.py",)),
    Break("lock-through-symlink", "the lock file is opened through a symbolic link (and truncates its target)",
          "toolkit/io/files.py", "os.O_NOFOLLOW | os.O_CREAT | os.O_RDWR", "os.O_CREAT | os.O_RDWR",
          ("tests/test_locking.py",)),
    Break("answers-sent-raw", "generate streams control characters of an answer to the terminal",
          "toolkit/commands/generate.py", "super().on_finalized_text(visible(text), stream_end)",
          "super().on_finalized_text(text, stream_end)", ("tests/test_generate.py",)),
    Break("join-timeout-ignored", "a node waits two minutes longer than --join-timeout for the others",
          "toolkit/training/distributed.py", 'f"--rdzv-conf=timeout={self.timeout}"', 'f"--rdzv-conf=timeout={self.timeout + 120}"',
          ("tests/test_distributed.py::test_a_node_whose_peer_never_joins_ends_in_time_and_the_run_resumes_on_one_machine",)),
    Break("rendezvous-noise-shown", "torchrun's traceback and socket logs reach the terminal when the nodes never meet",
          "toolkit/training/distributed.py", "        if out is None or not started.exists():\n", "        if out is None:\n",
          ("tests/test_distributed.py::test_a_node_whose_peer_never_joins_ends_in_time_and_the_run_resumes_on_one_machine",)),
    Break("rank-zero-claim-off", "under a torchrun started by hand nobody claims the run directory",
          "toolkit/commands/sft.py", "    if os.environ.get(distributed.HELD_ENV):\n", "    if True:\n",
          ("tests/test_distributed.py::test_two_nodes_started_by_torchrun_train_the_same_adapter_as_one_process",)),
    Break("photos-full-size", "the collator decodes every photo at full size",
          "toolkit/data/vision.py", "open_image(path, self.spec) for path in paths", "open_image(path) for path in paths",
          ("tests/test_photos.py",)),
    Break("jpeg-draft-off", "JPEGs are decoded whole and then reduced (no draft mode)",
          "toolkit/data/photos.py", "                image.draft(None, upright((wanted[3], wanted[2]), turn))", "                pass",
          ("tests/test_photos.py",)),
    Break("tile-layout-unchecked", "a photo is reduced as far as the target allows, even when its tiles change",
          "toolkit/data/photos.py", " and processed_shape(smaller, spec) == wanted:", ":", ("tests/test_photos.py",)),
    Break("size-warning-shown", "PIL's DecompressionBombWarning is not silenced",
          "toolkit/data/photos.py", '        warnings.simplefilter("ignore", Image.DecompressionBombWarning)\n', "",
          ("tests/test_photos.py",)),
    Break("shared-memory-ignored", "auto starts workers whose batches /dev/shm cannot hold (a bus error in containers)",
          "toolkit/data/photos.py", "    if batch_size_bytes and free is not None:\n", "    if False:\n",
          ("tests/test_photos.py::test_image_workers_follow_the_cpu_count_or_the_recipe",)),
    Break("exif-orientation-ignored", "a phone photo stored sideways reaches the model sideways",
          "toolkit/data/photos.py", "    return value if value in TRANSPOSES else 1\n", "    return 1\n",
          ("tests/test_photos.py",)),
    Break("shape-memo-by-count", "the template memo is keyed by the number of texts, not the conversation's shape",
          "toolkit/data/encode.py", "        key = json.dumps(shaped, ensure_ascii=False)\n",
          "        key = str(len(texts))\n", ("tests/test_datastore.py", "tests/test_images.py")),
    Break("batch-specials-as-tokens", "the batch path encodes special-token text in rows as the special tokens",
          "toolkit/data/encode.py", "        backend.encode_special_tokens = True\n",
          "        backend.encode_special_tokens = False\n", ("tests/test_datastore.py",)),
    Break("workers-out-of-order", "worker results are taken newest first, so rows change order",
          "toolkit/data/datastore.py", "                yield pending.popleft().get()\n        while pending:\n",
          "                yield pending.pop().get()\n        while pending:\n", ("tests/test_datastore.py",)),
    Break("chunk-problems-lost", "each chunk's problems replace the earlier chunks' of the same file",
          "toolkit/data/datastore.py", "                file_problems += result.problems\n",
          "                file_problems = result.problems\n", ("tests/test_datastore.py",)),
    Break("cache-key-without-content", "the cache key names the data files but not their content",
          "toolkit/data/datastore.py", "[[p, sources.content_hash(Path(p))] for p in paths]", "[[p] for p in paths]",
          ("tests/test_datastore.py",)),
    Break("cache-key-without-template", "the cache key leaves out the chat template",
          "toolkit/data/datastore.py", "    for part in (type(tokenizer).__name__, state, str(tokenizer.chat_template),\n",
          "    for part in (type(tokenizer).__name__, state, \"\",\n", ("tests/test_datastore.py",)),
    Break("cache-digest-unchecked", "a cache entry is used without checking its files' digests",
          "toolkit/data/datastore.py", "            if path.stat().st_size != size or file_digest(path) != digest:\n",
          "            if path.stat().st_size != size:\n", ("tests/test_datastore.py",)),
    Break("num-proc-in-cache-key", "data.num_proc is part of the cache key, so another process count encodes again",
          "toolkit/data/datastore.py", "    section.pop(\"num_proc\", None)\n", "", ("tests/test_datastore.py",)),
    Break("stored-labels-inverted", "the stored labels keep the prompt's ids and mask the answer",
          "toolkit/data/datastore.py", "np.where(flat_mask == 1, flat_ids, np.int32(-100))",
          "np.where(flat_mask == 0, flat_ids, np.int32(-100))", ("tests/test_datastore.py",)),
    Break("eval-held-out-is-train", "eval's held-out rows come from the training side of the split",
          "toolkit/training/prepare.py", "split_encodings(store, recipe.data, recipe.train.seed)[1].all_rows",
          "split_encodings(store, recipe.data, recipe.train.seed)[0].all_rows", ("tests/test_datastore.py",)),
    Break("surrogate-prefilter-wrong", "the lone-surrogate check only runs for \\uE... escapes",
          "toolkit/data/sources.py", 'MAYBE_SURROGATE = re.compile(r"\\\\u[dD][89abcdefABCDEF]")',
          'MAYBE_SURROGATE = re.compile(r"\\\\u[eE][89abcdefABCDEF]")', ("tests/test_data.py",
                                                                         "tests/test_sources.py")),
    Break("offload-restores-zeros", "an offloaded layer input comes back as zeros",
          "toolkit/training/activations.py", "            return saved.host.clone()  # the buffer goes back",
          "            return torch.zeros_like(saved.host)  # the buffer goes back", ("tests/test_activations.py",)),
    Break("auto-attention-never-flex", "attention auto loads SDPA for padding-free training on a GPU too",
          "toolkit/model/loading.py", '    return "flex_attention" if packed_on_gpu else "sdpa"\n',
          '    return "sdpa"\n', ("tests/test_padding_free.py",)),
    Break("auto-attention-not-for-training", "the Trainer loads its model as if for eval (auto attention: SDPA)",
          "toolkit/training/trainer.py", "    model = loading.load_model(recipe, precision, device, training=True)\n",
          "    model = loading.load_model(recipe, precision, device)\n", ("tests/test_padding_free.py",)),
    Break("host-memory-unchecked", "sft starts an offloading run whose layer inputs do not fit the host's free memory",
          "toolkit/training/fit.py", "    memory.check_host_memory(prepared, processes)  # before the run directory is touched\n",
          "", ("tests/test_activations.py",)),
    Break("host-memory-unchecked-on-nodes", "a node of a multi-machine job starts offloading that does not fit its memory",
          "toolkit/commands/sft.py", "        memory.check_host_memory(prepared, args.gpus)  # this node's processes; they skip `fit.train_into`\n",
          "", ("tests/test_activations.py",)),
    Break("host-memory-per-process-ignored", "the host-memory check counts one process when several train",
          "toolkit/training/memory.py", "    need = processes * host_bytes(prepared.model_config",
          "    need = host_bytes(prepared.model_config", ("tests/test_activations.py",)),
    Break("offload-hands-out-its-buffer", "unpack on the CPU returns the host buffer itself, which the next step reuses",
          "toolkit/training/activations.py", "            return saved.host.clone()  # the buffer goes back",
          "            return saved.host  # the buffer goes back", ("tests/test_activations.py",)),
    Break("host-buffers-not-reused", "every offloaded tensor gets a new host buffer (a cudaHostAlloc on a GPU)",
          "toolkit/training/activations.py",
          "        fitting = [buffer for buffer in self.free if buffer.numel() >= nbytes]\n",
          "        fitting = []\n", ("tests/test_activations.py",)),
    Break("host-buffer-shared", "a host buffer in use stays on the free list, so live tensors share it",
          "toolkit/training/activations.py", "            self.free.remove(buffer)\n            return buffer\n",
          "            return buffer\n", ("tests/test_activations.py",)),
    Break("host-block-unrounded", "the memory model counts offloaded inputs without PyTorch's power-of-two blocks",
          "toolkit/training/memory.py", "    return 1 << max(nbytes - 1, 0).bit_length()\n", "    return nbytes\n",
          ("tests/test_activations.py",)),
    Break("offload-not-installed", "gradient_checkpointing: offload leaves the checkpoint function as it was",
          "toolkit/training/activations.py", '            if getattr(function, "offloads_to", None) is None:\n',
          "            if False:\n", ("tests/test_activations.py",)),
    Break("all-layers-checkpointed", "train.checkpoint_layers is ignored: every layer stays checkpointed",
          "toolkit/training/activations.py", "            layer.gradient_checkpointing = keep\n",
          "            layer.gradient_checkpointing = True\n", ("tests/test_activations.py",)),
    Break("offload-memory-uncounted", "the memory model counts offloaded inputs as if they stayed on the GPU",
          "toolkit/training/memory.py", "    inputs = min(checkpointed, OFFLOAD_IN_FLIGHT) if setup.offload else checkpointed\n",
          "    inputs = checkpointed\n", ("tests/test_activations.py",)),
    Break("auto-layers-most", "checkpoint_layers: auto checkpoints every layer instead of the fewest that fit",
          "toolkit/training/memory.py", "    for layers in range(text_layers(text_config) + 1):\n",
          "    for layers in reversed(range(text_layers(text_config) + 1)):\n", ("tests/test_activations.py",)),
    Break("setup-timeout-ignored", "bench never stops a setup that runs past its time",
          "toolkit/bench/harness.py", "    deadline = time.monotonic() + limit_s if limit_s else None\n",
          "    deadline = None\n", ("tests/test_activations.py",)),
    Break("compile-not-undone", "the compiled layers stay compiled after training",
          "toolkit/training/compiling.py", "        layer._compiled_call_impl = None\n", "        pass\n", ("tests/test_activations.py",)),
    Break("sharded-offload-late", "sft accepts offload under FSDP and fails only after claiming the run directory",
          "toolkit/commands/sft.py", "    activations.check_strategy(recipe.train, args.strategy)\n", "", ("tests/test_activations.py",)),
    Break("micro-losses-unrecorded", "bench keeps no per-micro-batch losses",
          "toolkit/training/trainer.py", "            if self.loss_record is not None and self.model.training:\n",
          "            if False:\n", ("tests/test_activations.py",)),
    Break("auto-layers-unresolved", "train.checkpoint_layers: auto is never turned into a number before training",
          "toolkit/training/memory.py", '        update["checkpoint_layers"] = plan.checkpoint_layers\n', "        pass\n",
          ("tests/test_activations.py",)),
    Break("resume-unchecked", "--resume continues whatever the recipe now says (the comparison refuses nothing)",
          "toolkit/runs/resume.py", "    if refused:\n        raise ToolkitError(f\"--resume:", "    if False:\n"
          "        raise ToolkitError(f\"--resume:", ("tests/test_sft.py", "tests/test_resume.py")),
    Break("resume-budget-unchecked", "--resume takes a max_steps/epochs below what the checkpoint trained",
          "toolkit/runs/resume.py", "    steps, epochs = trained_so_far(checkpoint)\n",
          "    steps, epochs = trained_so_far(checkpoint)\n    return []\n", ("tests/test_sft.py",)),
    Break("images-not-fingerprinted", "the images a run reads are left out of its record",
          "toolkit/runs/resume.py", "            images.update(seen[path].encode(\"ascii\"))\n", "",
          ("tests/test_resume.py",)),
    Break("duplicate-keys-kept", "a key written twice in a recipe is taken silently (the last wins)",
          "toolkit/config/recipe.py", "    if loader.duplicates:\n", "    if False:\n", ("tests/test_recipe.py",)),
    Break("set-twice-kept", "--set of the same key twice is taken silently (the last wins)",
          "toolkit/config/recipe.py", "    check_overrides_once(parsed, overrides)\n", "", ("tests/test_recipe.py",)),
    Break("damaged-marker-ignored", "an unreadable or cut-short .toolkit.json reads as no marker at all",
          "toolkit/io/files.py", "        raise damaged_marker(folder, \"not valid JSON, perhaps cut short\") from None\n",
          "        return None\n", ("tests/test_run_safety.py",)),
    Break("noise-shown", "dependency noise is no longer hidden",
          "toolkit/cli.py", "        hide_known_noise(debug)\n", "        hide_known_noise(True)\n",
          ("tests/test_cli_errors.py", "tests/test_first_line.py")),
    Break("merge-ctrl-c-stops", "a Ctrl-C as the merged model lands stops merge with 130 though its output is complete",
          "toolkit/export/merging.py", "    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)\n",
          "    previous = signal.getsignal(signal.SIGINT)\n", ("tests/test_cli_errors.py",)),
    Break("retention-kl-reversed", "the drift KL is computed as KL(base || tuned)",
          "toolkit/evaluation/retention.py", "    return (tuned.exp() * (tuned - base)).sum(dim=-1)\n",
          "    return (base.exp() * (base - tuned)).sum(dim=-1)\n", ("tests/test_retention.py",)),
    Break("retention-base-adapter-on", "retention's base answers and logits come with the adapter on",
          "toolkit/evaluation/retention.py", "    base = base or model.disable_adapter\n", "    base = base or no_adapter\n",
          ("tests/test_retention.py",)),
    Break("retention-unshifted", "the KL is read at the answer tokens' own positions, not the ones predicting them",
          "toolkit/evaluation/retention.py", "if learned and t > 0]", "if learned]", ("tests/test_retention.py",)),
    Break("retention-warns-at-threshold", "a drift equal to retention.max_kl already warns",
          "toolkit/evaluation/retention.py", "    if retention.kl_per_token > settings.max_kl:\n",
          "    if retention.kl_per_token >= settings.max_kl:\n", ("tests/test_retention.py",)),
    Break("retention-images-kept", "image rows of the general set are asked of a model that reads no images",
          "toolkit/evaluation/retention.py", "    kept = [row for row in rows if reads_images or not",
          "    kept = [row for row in rows if True or not", ("tests/test_retention.py",)),
    Break("retention-data-ignored", "eval --retention-data asks the shipped set instead of the user's file",
          "toolkit/evaluation/run_eval.py", "    path, key = retention_data, \"--retention-data\"\n",
          "    path, key = None, \"--retention-data\"\n", ("tests/test_retention.py",)),
    Break("shared-batches-off", "several processes on mixed rows read the Trainer's own batches (modalities differ)",
          "toolkit/training/fit.py", "    if processes == 1 or len(set(with_images)) != 2:\n",
          "    if True:\n", ("tests/test_distributed.py",)),
    Break("short-pass-images-dropped", "the few image rows of a short last pass are left out",
          "toolkit/data/batching.py", "            previous_image_round.extend(spare_images)\n", "            pass\n",
          ("tests/test_batching.py",)),
    Break("spare-rows-dropped", "a modality's last few rows are left out of the shared batches",
          "toolkit/data/batching.py", "        rounds[-1].extend(spare)\n", "        pass\n", ("tests/test_batching.py",)),
    Break("rounds-unseeded", "each process shuffles the rounds with its own randomness",
          "toolkit/data/batching.py", "random.Random(seed + number).shuffle(passage_rounds)",
          "random.Random().shuffle(passage_rounds)", ("tests/test_batching.py",)),
    Break("sharded-mixed-eval-allowed", "fsdp evaluation of mixed eval rows starts (and would hang on GPUs)",
          "toolkit/training/fit.py", "    if strategy != \"ddp\" and prepared.recipe.train.eval_steps",
          "    if False and prepared.recipe.train.eval_steps", ("tests/test_distributed.py",)),
    Break("dropout-p-inverted", "the fused layers drop with probability 1 - p (95% of inputs at p = 0.05)",
          "toolkit/model/fastlora.py", "    return torch.native_dropout(x, p, True)\n",
          "    return torch.native_dropout(x, 1.0 - p, True)\n",
          ("tests/test_fastlora.py", "tests/test_real_model.py")),
    Break("dropout-off-in-training", "lora.dropout is not applied on the fused path",
          "toolkit/model/fastlora.py", "isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0",
          "False else 0.0", ("tests/test_fastlora.py",)),
    Break("dropout-on-in-eval", "the fused layers drop out in eval mode too",
          "toolkit/model/fastlora.py", "isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0",
          "isinstance(dropout, torch.nn.Dropout) else 0.0", ("tests/test_fastlora.py",)),
    Break("generator-moved-by-backward", "backward leaves the generator at the rebuilt mask's state",
          "toolkit/model/fastlora.py", "    finally:\n        set_rng_state(now, x.device)\n",
          "    finally:\n        pass\n", ("tests/test_fastlora.py",)),
    Break("dropout-mask-redrawn", "backward draws a new dropout mask instead of the one forward used",
          "toolkit/model/fastlora.py", "    set_rng_state(state, x.device)\n", "    pass\n", ("tests/test_fastlora.py",)),
    Break("dropout-gradient-unmasked", "the adapter's share of the input gradient skips the dropout mask",
          "toolkit/model/fastlora.py", "native_dropout_backward(gu @ a, mask, 1.0 / (1.0 - p))",
          "native_dropout_backward(gu @ a, torch.ones_like(mask), 1.0)", ("tests/test_fastlora.py",)),
    Break("frozen-dense-kept-in-autograd", "frozen dense layers run through F.linear, which keeps a view of the "
          "weight, so the recomputation runs the MLP's down projection again", "toolkit/model/fastlora.py",
          "(frozen_dense, frozen_dense_modules, \"dense\", \"dense\")",
          "(False, frozen_dense_modules, \"dense\", \"dense\")", ("tests/test_fastlora.py",)),
    Break("frozen-dense-off", "checkpointed recipes leave frozen dense layers to PyTorch",
          "toolkit/model/fastlora.py", "\"frozen_dense\": replicated and bool(recipe.train.gradient_checkpointing)",
          "\"frozen_dense\": False", ("tests/test_fastlora.py",)),
    Break("frozen-dense-under-fsdp", "frozen dense layers are switched under FSDP, where weights are sharded",
          "toolkit/model/fastlora.py", "\"frozen_dense\": replicated and bool(recipe.train.gradient_checkpointing)",
          "\"frozen_dense\": bool(recipe.train.gradient_checkpointing)", ("tests/test_fastlora.py",)),
    Break("varlen-rows-misread", "varlen finds rows where positions are 1, not 0",
          "toolkit/model/varlen.py", "    starts = (positions == 0).nonzero().flatten()\n",
          "    starts = (positions == 1).nonzero().flatten()\n", ("tests/test_varlen.py",)),
    Break("varlen-rows-per-layer", "varlen reads the positions on the host in every layer",
          "toolkit/model/varlen.py", "    if ref is None or ref() is not position_ids:\n", "    if True:\n",
          ("tests/test_varlen.py",)),
    Break("varlen-whole-batch-one-row", "varlen attends over the whole packed batch as one row",
          "toolkit/model/varlen.py", "    starts, longest = cached_row_starts(position_ids)\n",
          "    starts, longest = torch.tensor([0, query.shape[2]], dtype=torch.int32), query.shape[2]\n",
          ("tests/test_varlen.py",)),
    Break("auto-never-varlen", "auto keeps FlexAttention where PyTorch has varlen",
          "toolkit/model/loading.py", "        return varlen.NAME if varlen.available() else \"flex_attention\"\n",
          "        return \"flex_attention\"\n", ("tests/test_varlen.py",)),
    Break("varlen-for-padded-batches", "eval and generate load varlen, which reads no padding mask",
          "toolkit/model/loading.py", "    if chosen == \"varlen\" and not (training and recipe.train.padding_free):\n",
          "    if False:\n", ("tests/test_varlen.py",)),
    Break("varlen-unchecked", "validate lets varlen through on a CPU and without padding-free batches",
          "toolkit/training/prepare.py", "    check_attention(recipe, device, precision)\n", "", ("tests/test_varlen.py",)),
    Break("flex-on-cpu-unchecked", "validate lets flex_attention train on the CPU, which has no FlexAttention "
          "backward", "toolkit/training/prepare.py",
          "    if recipe.model.attn_implementation == \"flex_attention\" and not device.cuda:\n",
          "    if False:\n", ("tests/test_padding_free.py",)),
    Break("varlen-in-fp32", "auto picks varlen for an fp32 run, which FlashAttention cannot compute",
          "toolkit/model/loading.py", "varlen.available() and precision != \"fp32\" else",
          "varlen.available() else", ("tests/test_varlen.py",)),
    Break("varlen-fp32-unchecked", "validate lets varlen through in fp32",
          "toolkit/training/prepare.py", "    if precision == \"fp32\":\n", "    if False:\n",
          ("tests/test_varlen.py",)),
    Break("int8-bias-dropped", "the dequantized 8-bit layers leave out the frozen bias",
          "toolkit/model/fastlora.py", "    return None if layer.bias is None else layer.bias.to(dtype)\n",
          "    return None\n", ("tests/test_fastlora.py",)),
    Break("auto-batch-by-median", "batch_size: auto sizes the micro-batch by the median row, not the longest",
          "toolkit/training/memory.py", "model_config.get_text_config(), setup, max(lengths),",
          "model_config.get_text_config(), setup, sorted(lengths)[len(lengths) // 2],", ("tests/test_memory.py",)),
    Break("skip-modules-uncounted", "batch_size: auto and bench count skip_modules layers as quantized",
          "toolkit/training/memory.py", "skip_modules=tuple(skip) if (skip := recipe.quantization.skip_modules) else None)",
          "skip_modules=None)", ("tests/test_memory.py",)),
    Break("peak-flops-by-substring", "an H100 PCIe or NVL gets the SXM board's peak FLOPs (MFU too low)",
          "toolkit/bench/harness.py", "    form = next((form for model, form in PEAK_BF16_FLOPS",
          "    form = None and next((form for model, form in PEAK_BF16_FLOPS", ("tests/test_bench.py",)),
    Break("empty-message-unexpected", "an exception without a message makes a one-line error an unexpected one",
          "toolkit/errors.py", "(lines[0] if lines else type(err).__name__)[:limit]", "lines[0][:limit]",
          ("tests/test_cli_errors.py",)),
    Break("image-to-a-text-model", "generate --image on a model that cannot read images is not refused",
          "toolkit/commands/generate.py", "    if prompt.images and images is None:\n", "    if False:\n",
          ("tests/test_generate.py",)),
    Break("resume-by-name", "--resume picks the last checkpoint by name (checkpoint-8 after checkpoint-10)",
          "toolkit/runs/rundir.py", "sorted(found, key=lambda p: int(p.name.split(\"-\")[-1]), reverse=True)",
          "sorted(found, key=lambda p: p.name, reverse=True)",
          ("tests/test_sft.py::test_resume_picks_the_highest_step_not_the_last_name",)),
    Break("overwrite-any-toolkit-kind", "--overwrite replaces any toolkit directory (a merged model for sft)",
          "toolkit/io/files.py", "    if marker is None or marker.get(\"kind\") != kind:\n", "    if marker is None:\n",
          ("tests/test_run_safety.py::test_overwrite_never_replaces_a_directory_the_toolkit_made_for_another_purpose",)),
    Break("bf16-nan-grad-norm-ignored", "a NaN gradient norm does not stop a bf16 run",
          "toolkit/training/trainer.py", "self.check_grad_norm = precision != \"fp16\"",
          "self.check_grad_norm = precision not in (\"fp16\", \"bf16\")",
          ("tests/test_run_safety.py::test_a_nan_loss_stops_training",)),
    Break("merge-tolerance-loose", "merge's fp32 check lets logits off by 1% of the largest pass",
          "toolkit/export/merging.py", "RELATIVE_TOLERANCE = {\"fp32\": 1e-4,", "RELATIVE_TOLERANCE = {\"fp32\": 1e-1,",
          ("tests/test_merge.py::test_a_merged_model_off_by_one_percent_fails",)),
    Break("sharegpt-second-system", "a sharegpt row with its own system turn gets the recipe's system turn too",
          "toolkit/data/formatters.py",
          "    if system_prompt and turns[0][\"role\"] != \"system\":\n        turns.insert(0, {\"role\": \"system\", "
          "\"content\": system_prompt})\n    return turns\n\n\n@dataclass",
          "    if system_prompt:\n        turns.insert(0, {\"role\": \"system\", \"content\": system_prompt})\n"
          "    return turns\n\n\n@dataclass", ("tests/test_formatters.py",)),
    Break("sharegpt-images-reused", "every <image> human turn of a sharegpt row gets the first image",
          "toolkit/data/formatters.py", "images[next_image : next_image + count]", "images[:count]",
          ("tests/test_formatters.py",)),
    Break("prompt-last-turn-only", "eval, sampling and merge's check prompt with the last user turn alone",
          "toolkit/data/reading.py", "    return messages[:-1] if messages and messages[-1][\"role\"] == \"assistant\" else messages\n",
          "    return [m for m in messages[:-1] if m[\"role\"] == \"user\"][-1:]\n", ("tests/test_formatters.py",)),
    Break("generate-without-system", "generate's question leaves out the recipe's system prompt",
          "toolkit/data/encode.py",
          "    messages = [{\"role\": \"system\", \"content\": data_section.system_prompt}] if data_section.system_prompt "
          "else []\n", "    messages = []\n", ("tests/test_generate.py",)),
    Break("examples-input-empty", "eval's examples table shows an empty input for messages and sharegpt rows",
          "toolkit/commands/eval.py", "record[\"input\"] or record[\"instruction\"] or record[\"question\"]",
          "record[\"input\"] or record[\"instruction\"]", ("tests/test_terminal.py",)),
    Break("answers-to-wrong-rows", "batched answers are stored in batch order, not their rows' (sorted by length)",
          "toolkit/evaluation/generation.py", "            for i, text in zip(batch, tokenizer.batch_decode(",
          "            for i, text in zip(range(start, start + len(batch)), tokenizer.batch_decode(",
          ("tests/test_generate.py",)),
    Break("grouped-epochs-as-one", "with group_by_length, metrics.json and the run card count all passes as 1 epoch",
          "toolkit/runs/rundir.py", "    return train.epochs if train.group_by_length else 1\n", "    return 1\n",
          ("tests/test_sft.py::test_grouped_rows_reach_the_trainer_in_the_grouped_order",)),
    Break("global-batch-split-truncates", "a split over processes rounds the accumulation steps down",
          "toolkit/training/distributed.py", "    if grad_accum % processes == 0:\n", "    if grad_accum >= processes:\n",
          ("tests/test_distributed.py::test_every_split_keeps_the_global_batch_or_is_refused",)),
    Break("loss-per-micro-batch", "the loss is averaged per micro-batch, not per token over the accumulated batch",
          "toolkit/training/trainer.py",
          "    tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch\n",
          "    tokens = outputs.label_mask.sum()\n", ("tests/test_trainer_loss.py",)),
    Break("loss-halved-over-processes", "two processes train with half the gradient (DDP's average left in)",
          "toolkit/training/trainer.py",
          "        loss = loss * (trainer.accelerator.num_processes // trainer.get_tp_size())\n", "        loss = loss\n",
          ("tests/test_distributed.py::test_two_processes_train_the_same_adapter_as_one",)),
    Break("tiles-padded-before-content", "capped image tiles are padded before the content, not after",
          "toolkit/data/vision.py", "            pixels[i, j, : len(tiles)] = tiles\n",
          "            pixels[i, j, tile_slots - len(tiles) :] = tiles\n",
          ("tests/test_images.py::test_capped_tiles_are_padded_after_the_images_content",)),
    Break("capped-tiles-not-remapped", "a tile cap below the model's gives batches the cap's tile count",
          "toolkit/data/vision.py", "    return tile_slots(tiling, spec.model_max_tiles, max(",
          "    return tile_slots(tiling, spec.max_tiles, max(",
          ("tests/test_images.py::test_a_run_capped_below_the_models_tiles_trains",)),
    Break("merge-check-last-question", "merge's check prompts with each row's last question alone",
          "toolkit/export/merging.py",
          "    prompts = [encode.prompt(row, recipe.data, tokenizer) for row in text_rows",
          "    prompts = [encode.question_prompt(formatters.question_text(reading.conversation(row, recipe.data)), "
          "recipe.data, tokenizer) for row in text_rows",
          ("tests/test_merge.py::test_merges_check_prompts_are_whole_conversations",)),
    Break("image-batch-at-once", "a batch's images go to the image processor together (the torchvision one fails on a "
          "batch whose first row is text)", "toolkit/data/vision.py",
          "    processed = [[process_image(image, image_processor, spec) for image in images] for images in image_lists]\n",
          "    if not image_lists[0]:\n        image_processor(images=image_lists, max_image_tiles=spec.max_tiles)\n"
          "    processed = [[process_image(image, image_processor, spec) for image in images] for images in image_lists]\n",
          ("tests/test_image_processors.py",)),
    Break("collator-labels-unmasked", "the image collator learns the prompt too (completion_mask ignored)",
          "toolkit/data/vision.py", "    return [token if learned and token != image_token_id else -100 for",
          "    return [token if token != image_token_id else -100 for", ("tests/test_vision_collator.py",)),
    Break("collator-image-token-learned", "the image collator leaves <|image|> in the labels where the mask covers it",
          "toolkit/data/vision.py", "    return [token if learned and token != image_token_id else -100 for",
          "    return [token if learned else -100 for",
          ("tests/test_vision_collator.py::test_an_image_token_is_never_a_label_even_inside_the_answer",)),
    Break("collator-multiple-ignored", "the image collator pads to the longest row, not to the precision's multiple",
          "toolkit/data/vision.py", "pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)",
          "pad_token_id=pad_token_id, pad_to_multiple_of=None)", ("tests/test_vision_collator.py",)),
    Break("collator-length-unchecked", "a row whose completion_mask is shorter than its ids is cut silently",
          "toolkit/data/vision.py", "    if len(ids) != len(mask):\n", "    if False:\n",
          ("tests/test_vision_collator.py::test_a_row_whose_mask_and_ids_differ_in_length_is_refused",)),
    Break("image-rows-prepared", "TRL prepares image rows (labels built and completion_mask dropped before the collator)",
          "toolkit/config/translate.py", 'dataset_kwargs={"skip_prepare_dataset": True},', "",
          ("tests/test_translate.py",)),
    Break("image-columns-dropped", "the Trainer drops the image_paths column of image rows",
          "toolkit/config/translate.py", "kwargs.update(remove_unused_columns=False,",
          "kwargs.update(remove_unused_columns=True,", ("tests/test_translate.py", "tests/test_images.py")),
    Break("image-workers-ignored", "image batches are built in the training process whatever the workers",
          "toolkit/config/translate.py", "                      dataloader_num_workers=image_loader_workers,\n",
          "                      dataloader_num_workers=0,\n",
          ("tests/test_translate.py", "tests/test_photos.py::test_image_batches_are_built_in_loader_workers_and_train_the_same_adapter")),
    Break("image-workers-unsized", "auto starts as many image workers as the CPUs allow, whatever /dev/shm holds",
          "toolkit/data/vision.py", "batch_size_bytes=photos.batch_bytes(images.spec, rows))",
          "batch_size_bytes=0)",
          ("tests/test_images.py::test_image_loader_workers_follow_the_recipe_the_cpus_and_shared_memory",
           "tests/test_photos.py::test_image_workers_follow_the_cpu_count_or_the_recipe")),
    Break("tower-in-autograd", "checkpointing pulls the frozen vision tower into the backward pass",
          "toolkit/training/trainer.py", "    vision_tower.keep_frozen_tower_out_of_autograd(trainer.model)", "    pass",
          ("tests/test_vision_tower.py",)),
    Break("padding-queries-read-padding", "the split attention lets a padding token read padding keys too",
          "toolkit/model/vision_tower.py", "for queries, keys in ((~pad, ~hide), (pad, ~pad))", "for queries, keys in ((~pad, ~hide), (pad, ~hide))",
          ("tests/test_vision_tower.py",)),
    Break("filled-tiles-read", "filled tiles leave the padded tiles visible to real patches",
          "toolkit/model/vision_tower.py", "    per_tile = tokens_per_tile(module.config) if filled else 0",
          "    per_tile = 0", ("tests/test_vision_tower.py",)),
    Break("api-run-dir-ignored", "api.train trains into the recipe's output_dir, not the run directory asked for",
          "toolkit/api.py", "        path = files.expand(str(run_dir or loaded.output_dir))",
          "        path = files.expand(str(loaded.output_dir))", ("tests/test_api.py",)),
    Break("api-evaluate-writes", "api.evaluate writes eval_predictions.jsonl into the run as the command does",
          "toolkit/evaluation/run_eval.py", "    return Evaluation(summary, records, drift, notes)\n",
          "    write_predictions(run_dir / PREDICTIONS_FILE, records)\n    return Evaluation(summary, records, drift, notes)\n",
          ("tests/test_api.py",)),
    Break("eval-data-change-unsaid", "eval says nothing when its rows' file changed since training",
          "toolkit/runs/resume.py", "        if now != recorded.get(key):\n", "        if False:\n",
          ("tests/test_api.py",)),
    Break("attention-planned-per-layer", "the split attention is planned afresh in every encoder layer",
          "toolkit/model/vision_tower.py", "    if cached is not None and cached[0]() is attention_mask:",
          "    if False:", ("tests/test_vision_tower.py",)),
    Break("attention-plan-reused", "the split attention reuses the previous batch's plan",
          "toolkit/model/vision_tower.py", "    if cached is not None and cached[0]() is attention_mask:",
          "    if cached is not None:", ("tests/test_vision_tower.py",)),
    Break("image-token-unchecked", "validate accepts a tokenizer whose <|image|> is not the config's image token",
          "toolkit/training/prepare.py", "    if found != expected:\n", "    if False:\n", ("tests/test_images.py",)),
    Break("auto-images-uncounted", "batch_size: auto sizes image batches as text batches",
          "toolkit/training/memory.py", "    if not images:\n        return 0\n", "    if True:\n        return 0\n",
          ("tests/test_memory.py",)),
    Break("replay-off", "data.replay mixes no general rows into training",
          "toolkit/data/replay.py", "    count = replay_count(data_section.replay.share, len(train.rows))\n",
          "    count = 0\n",
          ("tests/test_replay.py", "tests/test_real_model.py::test_replaying_the_bases_own_answers_shrinks_the_drift")),
    Break("replay-seed-ignored", "the general rows are drawn in a fresh random order on every run",
          "toolkit/data/replay.py", "    rng = random.Random(seed)\n", "    rng = random.Random()\n", ("tests/test_replay.py",)),
    Break("fused-scale-wrong", "the fused LoRA path adds its product at twice alpha / r",
          "toolkit/model/fastlora.py", "        out.addmm_(u, lora_b.to(dtype).t(), alpha=scale)\n",
          "        out.addmm_(u, lora_b.to(dtype).t(), alpha=2 * scale)\n", ("tests/test_real_model.py",)),
    Break("loss-halved", "the training loss is half the mean negative log-likelihood",
          "toolkit/training/trainer.py", "    loss = -outputs.log_probs.sum() / torch.as_tensor(tokens).clamp(min=1)\n",
          "    loss = -outputs.log_probs.sum() / torch.as_tensor(tokens).clamp(min=1) / 2\n",
          ("tests/test_real_model.py",)),
    Break("lean-loss-tensor-parallel-ignored", "the lean loss scales by all processes, not by processes over the "
          "tensor-parallel size", "toolkit/training/trainer.py",
          "trainer.accelerator.num_processes // trainer.get_tp_size()", "trainer.accelerator.num_processes",
          ("tests/test_trainer_loss.py",)),
    Break("lean-loss-on-sharded-sequences", "sequence and context parallel steps take the lean loss",
          "toolkit/training/trainer.py", "sharded = parallel is not None and (parallel.sp_enabled or parallel.cp_enabled)",
          "sharded = False", ("tests/test_trainer_loss.py",)),
    Break("lean-loss-on-context-parallel", "context parallel steps take the lean loss (only Ulysses falls back)",
          "toolkit/training/trainer.py", "(parallel.sp_enabled or parallel.cp_enabled)", "parallel.sp_enabled",
          ("tests/test_trainer_loss.py",)),
    Break("num-tokens-dropped", "without token metrics the logs have no num_tokens",
          "toolkit/training/trainer.py", '                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]\n',
          "                pass\n", ("tests/test_trainer_loss.py",)),
    Break("num-tokens-stale-for-trl", "TRL's compute_loss reads the token total without the lean steps' count",
          "toolkit/training/trainer.py", "                    self.count_pending_tokens()\n", "",
          ("tests/test_trainer_loss.py",)),
    Break("extra-log-flushes-trl-metrics", "a sample's log entry takes TRL's running metrics from the loss entry",
          "toolkit/training/trainer.py", "            Trainer.log(self, dict(metrics))\n",
          "            self.log(dict(metrics))\n", ("tests/test_trainer_loss.py", "tests/test_sampling.py")),
    Break("extra-log-cancels-step-log", "logging a sample clears the Trainer's plan to log the step's loss",
          "toolkit/training/trainer.py", "            self.control.should_log = should_log\n", "            pass\n",
          ("tests/test_trainer_loss.py", "tests/test_sampling.py")),
    Break("sample-metric-lost", "the sampled term accuracy is printed but never logged",
          "toolkit/training/samples.py", "            self.trainer.log_extra({LOG_KEY: accuracy})", "            pass",
          ("tests/test_sampling.py",)),
    Break("padding-side-set-on-tokenizer", "generation leaves the tokenizer padding on the left",
          "toolkit/evaluation/generation.py", '    return tokenizer.pad({"input_ids": prompts}, padding=True,',
          '    tokenizer.padding_side = "left"\n    return tokenizer.pad({"input_ids": prompts}, padding=True,',
          ("tests/test_generate.py", "tests/test_sampling.py")),
    Break("prompts-right-padded", "generation pads prompts on the right, between the prompt and its answer",
          "toolkit/evaluation/generation.py", 'padding=True, padding_side="left",', 'padding=True, padding_side="right",',
          ("tests/test_generate.py",)),
    Break("plan-mutable", "the training plan is a plain dataclass: its fields can be assigned in place",
          "toolkit/training/prepare.py", "@dataclass(frozen=True)\nclass Prepared:", "@dataclass\nclass Prepared:",
          ("tests/test_api.py::test_a_plan_cannot_be_changed_in_place",)),
    Break("memory-plan-in-place", "resolving the auto settings writes the resolved recipe into the plan it was given",
          "toolkit/training/memory.py", "    return replace(prepared, recipe=recipe), plan\n",
          "    object.__setattr__(prepared, \"recipe\", recipe)\n    return prepared, plan\n",
          ("tests/test_api.py::test_a_plan_cannot_be_changed_in_place",)),
    Break("api-train-writes-into-the-plan", "api.train writes the run directory into the plan it was given",
          "toolkit/api.py", "        prepared = replace(recipe, recipe=recipe.recipe.model_copy(",
          "        prepared = recipe\n        object.__setattr__(prepared, \"recipe\", recipe.recipe.model_copy(",
          ("tests/test_api.py::test_training_a_plan_leaves_the_plan_as_it_was",)),
    Break("api-extract-always-overwrites", "api.extract replaces an existing file of its own without overwrite",
          "toolkit/api.py", "None if output is None else str(output), format, overwrite)",
          "None if output is None else str(output), format, True)",
          ("tests/test_extract.py::test_extract_from_python_refuses_with_the_commands_line",)),
    Break("api-merge-overwrite-forced", "api.merge checks the output as if overwrite were given",
          "toolkit/api.py", "    recipe, dtype = merging.start(run_dir, out, dtype, overwrite, tolerance, max_shard_size)",
          "    recipe, dtype = merging.start(run_dir, out, dtype, True, tolerance, max_shard_size)",
          ("tests/test_merge.py::test_merge_from_python_refuses_a_folder_it_did_not_make_with_the_commands_line",)),
    Break("merge-tolerance-unchecked", "a NaN or negative tolerance from Python reaches the merge",
          "toolkit/export/merging.py", "    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):",
          "    if False:", ("tests/test_merge.py::test_a_merge_from_python_that_fails_its_check_raises_and_writes_nothing",)),
    Break("merge-check-failure-returns", "a merge that fails its check returns its report instead of raising",
          "toolkit/export/merging.py", "        if problem:\n            raise CheckFailed(problem, report, traces)\n",
          "        if problem:\n            return report\n",
          ("tests/test_merge.py::test_a_merge_from_python_that_fails_its_check_raises_and_writes_nothing",
           "tests/test_merge.py::test_check_fails_when_the_tolerance_is_too_tight")),
    Break("api-bench-overrides-dropped", "api.bench measures the setups without the overrides given for all of them",
          "toolkit/api.py", "    planned = harness.plan_bench(str(recipe), list(overrides), list(compare),",
          "    planned = harness.plan_bench(str(recipe), [], list(compare),",
          ("tests/test_bench.py::test_bench_from_python_measures_what_the_command_measures",)),
    Break("compile-with-liger", "train.compile with train.liger_kernel passes validation (and fails after loading)",
          "toolkit/config/recipe.py", "if self.compile and self.liger_kernel:", "if False:",
          ("tests/test_activations.py",)),
    Break("padding-free-ignored", "train.padding_free is not passed to TRL: batches stay padded",
          "toolkit/config/translate.py", "        padding_free=train.padding_free,\n", "",
          ("tests/test_padding_free.py",)),
    Break("padding-free-images-allowed", "image rows with train.padding_free reach the model load",
          "toolkit/training/prepare.py", "    if recipe.train.padding_free:\n", "    if False:\n",
          ("tests/test_images.py",)),
    Break("int8-rows-off", "8-bit layers get their >3-D inputs as they are (eval/generate crash on CUDA at an outlier)",
          "toolkit/model/loading.py", '    if recipe.quantization.mode == "8bit" and quantize:', "    if False:",
          ("tests/test_images.py",)),
    Break("int8-rows-shape-lost", "an 8-bit layer fed rows gives its output back as rows",
          "toolkit/model/loading.py", "return output if shape is None else output.reshape(*shape, output.shape[-1])",
          "return output", ("tests/test_images.py",)),
]


def make_copy(parent: Path, name: str) -> Path:
    """A copy of the checkout, sharing its converted real model (tests/realmodel.py) instead of building it again."""
    tree = parent / name
    shutil.copytree(ROOT, tree, ignore=IGNORED)
    real_model = ROOT / ".pytest_cache" / "d" / "real-model"
    if real_model.is_dir():
        (tree / ".pytest_cache" / "d").mkdir(parents=True)
        (tree / ".pytest_cache" / "d" / "real-model").symlink_to(real_model)
    return tree


def apply(tree: Path, item: Break) -> None:
    path = tree / item.path
    text = path.read_text(encoding="utf-8")
    found = text.count(item.old)
    if found != 1:
        raise SystemExit(f"{item.name}: the text to change occurs {found} times in {item.path}, not once; update "
                         "the break to the current code")
    path.write_text(text.replace(item.old, item.new), encoding="utf-8")


def failing_tests(tree: Path, tests: list[str], first: bool = False) -> tuple[set[str], str]:
    """The tests that fail or error in `tree` (its own toolkit package on the path), and pytest's last line;
    `first`: stop at the first one."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                             *(["-x"] if first else []), *tests], cwd=tree, env=env, capture_output=True, text=True)
    failed = set(re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", result.stdout, flags=re.MULTILINE))
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    return failed, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="breaks to run (default: all)")
    parser.add_argument("--full", action="store_true", help="run the whole suite for each break")
    parser.add_argument("--list", action="store_true", help="list the breaks and exit")
    parser.add_argument("--first", action="store_true", help="stop each break's tests at the first failure (faster; "
                        "used only when nothing fails without a break)")
    parser.add_argument("--jobs", type=int, default=1, help="breaks run at once (each in its own copy)")
    args = parser.parse_args()
    chosen = [b for b in BREAKS if not args.names or b.name in args.names]
    if args.list or not chosen:
        for item in BREAKS:
            print(f"{item.name:28} {item.path:28} {item.what}")
        return 0 if chosen else 2
    with tempfile.TemporaryDirectory(prefix="break-it-") as scratch:
        scratch = Path(scratch)
        files_run = sorted({t for b in chosen for t in b.tests}) if not args.full else []
        already, summary = failing_tests(make_copy(scratch, "unbroken"), files_run)
        print(f"without a break: {summary}" + (f"; failing already: {', '.join(sorted(already))}" if already else ""))
        first = args.first and not already

        def run(item):
            tree = make_copy(scratch, item.name)
            apply(tree, item)
            failed, summary = failing_tests(tree, [] if args.full else list(item.tests), first)
            shutil.rmtree(tree)
            return item, sorted(failed - already), summary

        missed = []
        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            for item, caught, summary in pool.map(run, chosen):
                print(f"\n{item.name}: {item.what}\n  {summary}", flush=True)
                print("\n".join(f"  caught by {test}" for test in caught) or "  NOT CAUGHT", flush=True)
                if not caught:
                    missed.append(item.name)
    if missed:
        print(f"\nnot caught: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
