"""`segpipe report`: a dataset's health, contents and model errors as report.json and a self-contained report.html."""
