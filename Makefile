# make demo  - set up and run the main job (daemon + llm, tts, image on the built-in models)
# make test  - set up and run the whole test suite
# make bench - run the benchmarks in bench/
# make soak  - 30 minutes of mixed load with faults (bench/soak.py)
.PHONY: setup demo test bench soak clean

setup:
	./scripts/setup.sh

demo: setup
	./scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/overhead.py
	.venv/bin/python bench/llm.py
	.venv/bin/python bench/tts.py
	.venv/bin/python bench/isolation.py
	.venv/bin/python bench/concurrency.py
	.venv/bin/python bench/remote.py
	.venv/bin/python bench/cli_latency.py
	.venv/bin/python bench/gpu.py

soak: setup
	.venv/bin/python bench/soak.py --minutes 30

clean:
	rm -rf .venv build *.egg-info .pytest_cache
