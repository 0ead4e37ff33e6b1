"""``python -m fastquant.info``: what fastquant was built with and which kernels it will run here (the report
is :mod:`fastquant.app.info`)."""

from fastquant.app.info import main

if __name__ == "__main__":
    main()
