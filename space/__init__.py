"""The Gradio Space: a thin front end over `core` (prune one model interactively, see the evidence, push it).

`app.py` builds the page; everything it calls lives in gradio-free modules so it can be tested without a browser:
`handlers` (what each button does), `forms` (form -> Recipe), `models` (which model, from where),
`evaluation` (perplexity, speed, generations, lm-eval), `chart`, `card`, `hub` (push) and `jobs` (one job at a time,
results kept on disk and cleaned up).
"""
