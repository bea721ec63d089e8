# Every target works on a fresh clone with nothing but python3 and make.
PYTHON ?= python3
VENV   ?= .venv
# torch, torchvision and ray are installed first, pinned to the versions tested here (pip takes these
# torch builds from this machine's disk). Override on other hosts, e.g.
# `make TORCH="torch==2.11.0 torchvision==0.26.0"`.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
RAY    ?= ray[data,train,default]==2.60.0
STAMP  := $(VENV)/.segpipe-installed
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install -q --disable-pip-version-check
DEMO   ?= demo-out
# Headless Chromium opens report.html in the tests (Debian's package; installed once, when missing).
CHROMIUM ?= /usr/bin/chromium

.PHONY: venv test demo clean chromium

venv: $(STAMP)

# Rebuilt whenever the dependencies may have changed. .ci/constraints.txt pins the versions tested
# together: without it pip backtracks for many minutes between s3fs's botocore and moto's boto3.
$(STAMP): pyproject.toml Makefile .ci/constraints.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -c .ci/constraints.txt $(TORCH) '$(RAY)'
	$(PIP) -c .ci/constraints.txt -e '.[dev]'
	$(PIP) -c .ci/constraints.txt --no-deps tidecv
	touch $(STAMP)

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q -p no:cacheprovider

chromium: $(CHROMIUM)

# Only when the browser is missing: apt-get as root, else through sudo.
$(CHROMIUM):
	$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -q
	$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q chromium

# The main job end to end: synthesise, train the built-in model briefly on Ray Train, label the
# validation split with it (`segpipe infer` on Ray), evaluate. About 5 minutes on 2 cores.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/segpipe synth $(DEMO) --images 200 --split train --seed 0 --shard-size 50
	$(BIN)/segpipe synth $(DEMO) --images 50 --split val --seed 1
	$(BIN)/segpipe validate $(DEMO)/annotations/panoptic_val.json --images $(DEMO)/val
	$(BIN)/segpipe validate $(DEMO)/annotations/instances_val.json --images $(DEMO)/val
	$(BIN)/segpipe train --train $(DEMO)/annotations/panoptic_train.json --val $(DEMO)/annotations/panoptic_val.json \
		--model segpipe_small --steps 200 --checkpoint-every 50 --out $(DEMO)/model
	$(BIN)/segpipe infer --input $(DEMO)/val --model segpipe_small --weights $(DEMO)/model/model.pt \
		--stuff-area 64 --out $(DEMO)/labels-val
	$(BIN)/segpipe validate $(DEMO)/labels-val/panoptic_pred.json
	$(BIN)/segpipe eval pq --gt $(DEMO)/annotations/panoptic_val.json \
		--pred $(DEMO)/labels-val/panoptic_pred.json --out $(DEMO)/labels-val/pq.json
	$(BIN)/segpipe eval ap --gt $(DEMO)/annotations/instances_val.json \
		--pred $(DEMO)/labels-val/instances_pred_results.json --out $(DEMO)/labels-val/ap.json
	# One data-engine round: pseudo-label a pool of 200 unlabeled images, filter, retrain on train + kept, promote.
	$(BIN)/segpipe synth $(DEMO) --images 200 --split pool --seed 2
	printf '%s\n' "out: engine" "model: segpipe_small" "start: model/model.pt" \
		"labeled: annotations/panoptic_train.json" "unlabeled: pool" "heldout: annotations/panoptic_val.json" \
		"rounds: 1" "train: {steps: 100, batch_size: 8, pseudo_ratio: 0.5}" > $(DEMO)/engine.yaml
	$(BIN)/segpipe engine run $(DEMO)/engine.yaml
	$(BIN)/segpipe engine status $(DEMO)/engine
	# The report of what it labeled: the val split's contents and the model's per-class PQ with intervals.
	$(BIN)/segpipe report --dataset $(DEMO)/annotations/panoptic_val.json --pred $(DEMO)/labels-val \
		--images $(DEMO)/val --out $(DEMO)/report
	@echo "demo: data in $(DEMO)/ (train: 200 images + 4 tar shards, val: 50), model in $(DEMO)/model/model.pt"
	@echo "      (checkpoints/, metrics.json), labels of val in $(DEMO)/labels-val/ (predictions/*.parquet,"
	@echo "      panoptic_pred.json + PNGs, instances_pred_results.json, pq.json, ap.json), one engine round in"
	@echo "      $(DEMO)/engine/ (round-N/manifest.json; the job: $(DEMO)/engine.yaml)"
	@echo "report: $(DEMO)/report/report.html (numbers: $(DEMO)/report/report.json)"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info $(DEMO)
